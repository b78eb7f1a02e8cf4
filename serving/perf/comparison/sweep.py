"""The served path under several Triton repository settings, side by side in one run (the
tuning evidence behind ``RepositoryOptions``' defaults; ``benchmarks/serving_sweep.py``).

Every configuration gets its own repository (same ONNX file) and its own tritonserver,
all started first and idle between their turns; then ``passes`` passes go round robin
over them: in-process best batch, Triton at concurrency N, in-process batch-1 latency,
Triton at concurrency 1. The ratios are the medians over passes. A configuration named
``...+nospin`` serves through a copy of the Python backend with ONNX Runtime's intra-op
spin-waiting off (``session.intra_op.allow_spinning=0``): an experiment on a temporary
copy, not a change to ``serving/triton_backend/model.py``::

    python benchmarks/serving_sweep.py --data-dir ../shared/data \\
        --model-repository model_repository --only 0,1 --passes 1
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from serving.perf.accounting import BenchError, measured
from serving.perf.comparison.model import Prepared, prepare
from serving.perf.comparison.paths import (
    inprocess_best,
    inprocess_latency,
    inprocess_parallel,
    inprocess_sweep,
    ort_session,
    triton_level,
    triton_server,
)
from serving.perf.comparison.settings import Settings
from serving.repository.layout import write_model_set
from serving.repository.model_config import RepositoryOptions

SPIN_OFF = (
    "    options.inter_op_num_threads = 1\n",
    "    options.inter_op_num_threads = 1\n"
    '    options.add_session_config_entry("session.intra_op.allow_spinning", "0")\n',
)


@dataclass(frozen=True)
class Config:
    name: str
    delay_us: int = 0
    preferred: tuple[int, ...] = ()
    instances: int = 1
    intra: int = 0
    protocol: str = "grpc"
    nospin: bool = False
    borrow: bool = False  # borrow_idle_cores (serving/triton_backend/model.py)


CONFIGS = (
    Config("project default (5000us, 8/16/32)", 5000, (8, 16, 32)),
    Config("delay 0", 0),
    Config("delay 100", 100),
    Config("delay 500", 500),
    Config("delay 1000", 1000),
    Config("delay 2000, pref 16", 2000, (16,)),
    Config("delay 0, 2 inst x intra 1", 0, instances=2, intra=1),
    Config("delay 100, 2 inst x intra 1", 100, instances=2, intra=1),
    Config("delay 500, 2 inst x intra 1", 500, instances=2, intra=1),
    Config("delay 0, 2 inst x intra 2", 0, instances=2, intra=2),
    Config("delay 0, http", 0, protocol="http"),
    Config("delay 0, 2 inst x intra 1, http", 0, instances=2, intra=1, protocol="http"),
    Config("delay 0 +nospin", 0, nospin=True),
    Config("delay 0, 2 inst x intra 1 +nospin", 0, instances=2, intra=1, nospin=True),
    Config("delay 250, pref 8, 2 inst x intra 1", 250, (8,), instances=2, intra=1),
    Config("delay 500, pref 8, 2 inst x intra 1", 500, (8,), instances=2, intra=1),
    Config("delay 1000, pref 8, 2 inst x intra 1", 1000, (8,), instances=2, intra=1),
    Config("delay 500, pref 8, 2 inst x intra 1 +borrow", 500, (8,), 2, 1, borrow=True),
)


@dataclass(frozen=True)
class SweepOptions:
    """The sweep's own options (``benchmarks/serving_sweep.py``)."""

    model_repository: str  # source of the ONNX model
    data_dir: str = ""
    passes: int = 3
    duration_s: float = 4.0
    only: str = ""  # comma-separated indices into CONFIGS ("": all)
    quiet_cpu: float = 0.2


def selected(only: str) -> list[Config]:
    """The configurations whose indices ``only`` lists ("0,3"); all of them for ""."""
    wanted = only.split(",") if only else []
    return [c for i, c in enumerate(CONFIGS) if not wanted or str(i) in wanted]


def bench_settings(ours: SweepOptions) -> Settings:
    """The side-by-side benchmark's settings for the reused repository, with the shorter
    levels a sweep of many configurations can afford."""
    data_dir = ours.data_dir
    if not data_dir:
        from training.config import default_data_dir

        data_dir = default_data_dir()
    return Settings(
        data_dir=data_dir,
        model_repository=ours.model_repository,
        duration_s=ours.duration_s,
        warmup_s=1,
        sweep_s=2,
        latency_runs=300,
    )


def write_repository(prepared: Prepared, config: Config, root: Path) -> Path:
    """A repository of ``prepared``'s model with ``config``'s batching and instances."""
    options = RepositoryOptions(
        max_batch_size=32,
        preferred_batch_sizes=config.preferred,
        max_queue_delay_us=config.delay_us,
        instance_count=config.instances,
        intra_op_threads=config.intra,
        borrow_idle_cores=config.borrow,
    )
    repository = Path(tempfile.mkdtemp(dir=root, prefix="repo-"))
    models = write_model_set(repository, prepared.spec, prepared.onnx_path, options)
    if config.nospin:
        backend = models.classifier / str(models.version) / "model.py"
        text = backend.read_text()
        if SPIN_OFF[0] not in text:
            raise BenchError(f"{backend}: cannot find where to turn spinning off")
        backend.write_text(text.replace(*SPIN_OFF, 1))
    return repository


def measure(
    sessions: tuple,
    images: np.ndarray,
    best: int,
    url: str,
    model: str,
    args: Settings,
    config: Config,
) -> dict[str, float]:
    """One pass over one configuration: its ratios and what they rest on."""
    args = replace(args, protocol=config.protocol)
    session, singles = sessions
    a = measured(inprocess_best, session, images, best, args.sweep_s)
    ap = measured(inprocess_parallel, singles, images, best, args.sweep_s)
    b = measured(triton_level, url, model, args, args.concurrency)
    a1 = measured(inprocess_latency, session, images, args.latency_runs)
    b1 = measured(triton_level, url, model, args, 1)
    return {
        "served/inprocess": b.throughput / a.throughput,
        "served/parallel": b.throughput / ap.throughput,
        "p99c1/inprocess_b1": b1.p99_ms / a1.p99_ms,
        "served": b.throughput,
        "inprocess": a.throughput,
        "c1_p99": b1.p99_ms,
        "b1_p99": a1.p99_ms,
        "avg_batch": b.extra.get("avg_batch", 0.0),
        "failed": b.failed + b1.failed,
        "others_cpu": max(r.others_cpu for r in (a, ap, b, a1, b1)),
    }


def run_sweep(ours: SweepOptions, workdir: Path) -> list[str]:
    """Every selected configuration served at once, ``ours.passes`` passes round robin;
    the report's lines (:func:`report`)."""
    args = bench_settings(ours)
    configs = selected(ours.only)
    prepared, images = prepare(args, workdir)
    session = ort_session(prepared.onnx_path)
    singles = [ort_session(prepared.onnx_path, 1) for _ in range(2)]
    sweep = inprocess_sweep(session, images, (8, 16, 32, 64), 2.0)
    best = max(sweep, key=lambda r: r.throughput).batch_size
    results: dict[str, list[dict]] = {c.name: [] for c in configs}
    with contextlib.ExitStack() as stack:
        urls = {
            c.name: stack.enter_context(
                triton_server(write_repository(prepared, c, workdir), c.protocol)
            )
            for c in configs
        }
        for p in range(1, ours.passes + 1):
            for c in configs:
                sessions = (session, singles)
                r = measure(sessions, images, best, urls[c.name], prepared.classifier, args, c)
                results[c.name].append(r)
                values = " ".join(f"{k}={v:.2f}" for k, v in r.items())
                print(f"pass {p} {c.name:<36} {values}", flush=True)
    return report(results, ours, best)


def report(results: dict[str, list[dict]], ours: SweepOptions, best: int) -> list[str]:
    """A markdown table: per configuration, medians over its quiet passes."""
    lines = [
        f"# benchmarks/serving_sweep.py — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Medians over {ours.passes} passes of {ours.duration_s:.0f} s per level; in-process "
        f"ONNX Runtime at batch {best} (one 2-thread session; and 'parallel': two 1-thread "
        "sessions side by side) measured right before each configuration. "
        "Single-image requests to NAME_onnx; concurrency 16 for throughput, 1 for p99. "
        f"Medians over the passes in which other users' processes took <= {ours.quiet_cpu} "
        "cores during every measurement (all passes when none was that quiet); others' CPU "
        "is the median of the per-pass maxima.",
        "",
        "| configuration | served/inprocess | served/parallel | served img/s | in-process img/s | "
        "avg batch | p99 c1 / in-process b1 | c1 p99 ms | failed | quiet passes | others' CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, every in results.items():
        runs = [r for r in every if r["others_cpu"] <= ours.quiet_cpu] or every
        med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        fails = int(sum(r["failed"] for r in every))
        lines.append(
            f"| {name} | {med['served/inprocess']:.2f} | {med['served/parallel']:.2f} | "
            f"{med['served']:.0f} | "
            f"{med['inprocess']:.0f} | {med['avg_batch']:.1f} | {med['p99c1/inprocess_b1']:.2f} | "
            f"{med['c1_p99']:.1f} | {fails} | {len(runs) if runs is not every else 0}"
            f"/{len(every)} | {med['others_cpu']:.2f} |"
        )
    return lines
