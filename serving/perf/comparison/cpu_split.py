"""Where a served request's CPU goes, beside in-process ONNX Runtime: the work of
``benchmarks/serving_cpu_split.py``.

For the classifier ``NAME_onnx`` of a model repository, two servers take turns
(alternating order, ``--rounds`` rounds): the classifier as exported, and a copy whose
``model.py`` returns zeros instead of running ONNX Runtime (the served path with no model
work). perf_analyzer sends single-image requests at ``--concurrency`` to each; the CPU
time of perf_analyzer, of the tritonserver process and of its Python-backend stubs is
read from ``/proc`` around the run and divided by the requests answered. In process, the
same ONNX file runs at several batch sizes with one thread and with every core, and two
one-thread sessions side by side at the served average batch (what two one-thread
instances do, contending for the caches). Core-milliseconds per image compare them;
:func:`run` returns the report's markdown lines::

    python benchmarks/serving_cpu_split.py --model-repository model_repository --out /tmp/split

``served/inprocess >= 0.90`` (the side-by-side benchmark) needs a served request to cost at
most ``cores / (0.9 x in-process best img/s)`` core-ms, load generator included; the
last lines print that budget beside what the served path spends outside ONNX Runtime.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from serving.perf.accounting import BenchError, process_jiffies, tree_jiffies
from serving.perf.comparison.model import find_classifier
from serving.perf.comparison.paths import (
    free_ports,
    inprocess_parallel,
    ort_session,
    ort_throughput,
)
from serving.perf.perf_analyzer import locate, pa_level, write_input

TICK = os.sysconf("SC_CLK_TCK")
RUN_ANCHOR = "    def _run(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:\n"
ZERO_WORK = (  # the requested outputs as zeros: probabilities (N, K), a 1 x 1 class activation map
    "        return [np.zeros((len(batch), {classes}) + ((1, 1) if n == 'cam' else ()), np.float32)"
    " for n in names]  # zero-work copy\n"
)


@dataclass(frozen=True)
class CpuSplitOptions:
    """What ``benchmarks/serving_cpu_split.py`` measures and how (see its ``--help``)."""

    model_repository: str = "model_repository"
    model: str = ""  # the classifier (NAME or NAME_onnx; "": the only one)
    rounds: int = 4
    concurrency: int = 16
    duration_s: float = 6.0  # per perf_analyzer run
    seconds: float = 1.5  # per in-process measurement
    perf_analyzer: str = ""  # its binary ("": found or fetched)


def copies(repository: Path, name: str, classes: int, root: Path) -> dict[str, Path]:
    """Two one-model repositories: the classifier as exported and a zero-work copy."""
    out = {}
    for variant in ("exported", "zero-work"):
        target = root / variant / name
        shutil.copytree(repository / name, target, symlinks=True)
        out[variant] = root / variant
    for model_py in (out["zero-work"] / name).glob("*/model.py"):
        text = model_py.read_text()
        if RUN_ANCHOR not in text:
            raise BenchError(f"{model_py}: no `{RUN_ANCHOR.strip()}` to short-circuit")
        model_py.unlink()  # may be a symlink into the original repository
        zero = ZERO_WORK.format(classes=classes)
        model_py.write_text(text.replace(RUN_ANCHOR, RUN_ANCHOR + zero))
    return out


def served_split(
    repository: Path, model: str, pa, inputs: Path, args: CpuSplitOptions
) -> dict[str, float]:
    """CPU ms per request by process, throughput and average batch at ``args.concurrency``."""
    from serving.server.network import find_free_port
    from serving.server.process import TritonServer

    opts = SimpleNamespace(duration_s=args.duration_s, protocol="grpc", shared_memory="none")
    http, grpc, metrics = free_ports(3, find_free_port)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics) as srv:
        url, pid = srv.grpc_url, srv.pid
        if pid is None:
            raise BenchError(f"tritonserver over {repository} has no process")
        pa_level(pa, url, model, opts, args.concurrency, inputs)  # warm-up, not counted
        server0, tree0 = process_jiffies(pid), tree_jiffies(pid)
        row = pa_level(pa, url, model, opts, args.concurrency, inputs)
        server, tree = process_jiffies(pid) - server0, tree_jiffies(pid) - tree0
    per_request = 1000 / TICK / row.requests
    split = {
        "img/s": row.throughput,
        "batch": row.extra["avg_batch"],
        "perf_analyzer": row.extra["client_cpu_ms"],
        "tritonserver": server * per_request,
        "stubs": (tree - server) * per_request,
    }
    split["total"] = split["perf_analyzer"] + split["tritonserver"] + split["stubs"]
    return split


def inprocess(
    onnx: Path, images: np.ndarray, batch: int, args: CpuSplitOptions
) -> dict[str, float]:
    """Core-ms per image: one thread at several batch sizes, every core at its best, and
    two one-thread sessions side by side at ``batch``."""
    cores = os.cpu_count() or 1
    one, wide = ort_session(onnx, 1), ort_session(onnx, cores)
    out = {}
    for b in sorted({1, batch, 8, 16, 32}):
        out[f"1 thread, batch {b}"] = 1000 / ort_throughput(one, images, b, args.seconds)
    best = max(ort_throughput(wide, images, b, args.seconds) for b in (16, 32, 64))
    out[f"{cores} threads, best of batch 16/32/64"] = cores * 1000 / best
    pair = [ort_session(onnx, 1) for _ in range(cores)]
    rate = inprocess_parallel(pair, images, batch, args.seconds).throughput
    out[f"{cores} x 1-thread side by side, batch {batch}"] = cores * 1000 / rate
    out["best img/s"] = best
    return out


def run(args: CpuSplitOptions, workdir: Path) -> list[str]:
    repository = Path(args.model_repository)
    name, spec, onnx = find_classifier(repository, args.model)
    images = np.random.default_rng(0).standard_normal(
        (64, spec.channels, spec.image_size, spec.image_size), dtype=np.float32
    )
    pa = locate(args.perf_analyzer)
    inputs = write_input(images[:32], spec.input_name, workdir / "inputs.json")
    variants = copies(repository, name, spec.num_classes, workdir)
    served: dict[str, list[dict]] = {v: [] for v in variants}
    local: list[dict] = []
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for variant in order:
            served[variant].append(served_split(variants[variant], name, pa, inputs, args))
            print(f"round {r + 1} {variant}: {fmt(served[variant][-1])}", flush=True)
        if r == 0:  # the served average batch, kept for every round (the same rows)
            batch = max(1, round(served["exported"][0]["batch"]))
        local.append(inprocess(onnx, images, batch, args))
        print(f"round {r + 1} in process: {fmt(local[-1])}", flush=True)
    med = {v: median(rows) for v, rows in served.items()}
    ours = median(local)
    cores = os.cpu_count() or 1
    budget = cores * 1000 / (0.9 * ours["best img/s"])
    outside = med["exported"]["total"] - (med["exported"]["stubs"] - med["zero-work"]["stubs"])
    lines = [f"# Served CPU split ({args.rounds} rounds, medians; c{args.concurrency}, gRPC)", ""]
    lines += [
        f"{time.strftime('%Y-%m-%d %H:%M')}, {cores} cores, classifier {name} of "
        f"{repository}; CPU in ms per request (per image in process)",
        "",
    ]
    lines += ["| path | " + " | ".join(med["exported"]) + " |", "| --- |" + " ---: |" * 6]
    lines += [
        f"| {v} | " + " | ".join(f"{x:.3f}" for x in m.values()) + " |" for v, m in med.items()
    ]
    lines += ["", "| in process | core-ms per image |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in ours.items() if k != "best img/s"]
    lines += [
        "",
        f"served: {med['exported']['total']:.2f} core-ms per request, of which outside ONNX "
        f"Runtime {outside:.2f} (perf_analyzer {med['exported']['perf_analyzer']:.2f}); "
        f"zero-work served path {med['zero-work']['total']:.2f}",
        f"in process best: {ours['best img/s']:.1f} img/s = "
        f"{cores * 1000 / ours['best img/s']:.2f} core-ms per image; served/inprocess >= 0.90 "
        f"allows {budget:.2f} core-ms per request, load generator included",
        f"served/inprocess={med['exported']['img/s'] / ours['best img/s']:.2f}",
    ]
    return lines


def fmt(row: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in row.items())


def median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
