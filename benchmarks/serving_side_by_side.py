"""Served against in-process against naive: one exported DenseNet-121, three ways, one run.

(a) ONNX Runtime in this process at its best batch size (a sweep), plus batch-1 latency;
(b) our Triton server (the embedded ``tritonserver``, started here on free loopback ports)
    with single-image requests to the classifier ``NAME_onnx`` (preprocessed float
    tensors: the same work as (a)) at concurrency 16 for throughput and at concurrency 1
    for p99. The load comes from NVIDIA's perf_analyzer
    (``serving_perf_analyzer.py``: found on PATH or in medimg's cache, else fetched from
    the package registry), the tool Triton's own numbers are quoted with; (b'), measured
    right after (b) in the same brackets, is the same load from medimg's Python client
    (:func:`serving.perf.bench.run_bench`), for information. ``--load-generator medimg``
    makes medimg's client (b) and drops (b');
(c) a naive baseline: FastAPI + PyTorch eager, one request one forward pass
    (``serving/perf/comparison/naive_server.py``, its own uvicorn process stopped by its PID), driven
    by an asyncio aiohttp client with the same concurrency and duration as (b).

After the batch-size sweep both servers stay up and ``--rounds`` rounds run every path
back to back, so noise from other people's work hits them alike: in every round (a) runs
right before and right after (b) at concurrency N, and in-process batch-1 latency right
before and after (b) at concurrency 1, so a drift of the machine's speed cancels. Each
measurement records how many cores processes outside this benchmark kept busy meanwhile;
throughput ratios are the medians of the per-round ratios over the rounds where that
stayed under ``--quiet-cpu`` (all rounds when none did), and the p99 ratio compares the
p99 of every request of those rounds pooled on each side (one round's p99 rests on its
few slowest requests). (a') -- one-thread sessions side by side in process, what two
one-thread Triton instances do -- is printed for information. Prints a table, the
ratios b/a (target >= 0.90), b/c (target >= 3) and p99 at concurrency 1 through Triton
against in-process batch-1 p99 (target <= 1.5), and as its last line
``served/inprocess=R1 served/naive=R2 p99c1/inprocess_b1=R3``. Results go to
``benchmarks/results/serving.{json,md}`` (or ``--results-dir``); one row per run is appended
to ``serving.csv``.

With no ``--model-repository`` the model is made here through the real code path:
DenseNet-121 for the data set's spec, a few training steps of ``training.epoch.run_epoch``
(``--train-steps 0`` skips them: speed does not depend on weight values),
``serving.export.onnx.export_onnx`` and ``serving.repository.layout.write_model_set`` into a
temporary directory, with the repository options below. Their defaults are
``serving.repository.model_config.RepositoryOptions()``, what ``medimg export`` writes (settings
chosen with ``benchmarks/serving_sweep.py``), so this measures the exported product; the
options override them. The code is split by concern: ``serving_model.py`` (the model),
``serving_paths.py`` (the measured paths), ``serving_perf_analyzer.py`` (the load
generator), ``serving_report.py`` (rounds and report), ``serving_common.py`` (the row, the
error, others' CPU)::

    python benchmarks/serving.py --data-dir ../shared/data
    python benchmarks/serving.py --data-dir ../shared/data --model-repository model_repository \
        --weights model.pt --protocol http --duration-s 20 --load-generator medimg
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import fields
from functools import partial
from pathlib import Path

import numpy as np

from serving.perf.accounting import BenchError
from serving.perf.comparison.model import (
    BATCH_SIZES,
    REPOSITORY_FLAGS,
    Prepared,
    config_summary,
    options_summary,
    prepare,
    repository_defaults,
    repository_options,
)
from serving.perf.comparison.paths import (
    inprocess_sweep,
    naive_server,
    ort_session,
    triton_level,
    triton_server,
)
from serving.perf.comparison.report import (
    Round,
    client_lines,
    last_line,
    markdown,
    measure_round,
    median_ratios,
    quiet_rounds,
    ratio_lines,
    row_text,
    spread,
    summary_rows,
    table,
    write_results,
)
from serving.perf.perf_analyzer import locate, pa_level, write_input

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- command line


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="pneumoniamnist")
    p.add_argument("--data-dir", default="", help="folder holding <dataset>.npz")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model-repository", default="", help="reuse this repository")
    p.add_argument("--model", default="", help="classifier in --model-repository (NAME)")
    p.add_argument("--weights", default="", help="save_weights file for the naive baseline")
    p.add_argument("--train-steps", type=int, default=8, help="batch-32 steps; 0: no training")
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument(
        "--load-generator",
        choices=("perf_analyzer", "medimg"),
        default="perf_analyzer",
        help="(b)'s load: NVIDIA's perf_analyzer (fetched into medimg's cache when not on "
        "PATH), with (b') medimg's Python client beside it for information; or medimg's "
        "Python client alone (serving.perf.bench.run_bench)",
    )
    p.add_argument("--perf-analyzer", default="", help="path of a perf_analyzer binary to use")
    p.add_argument(
        "--shared-memory",
        choices=("none", "system"),
        default="none",
        help="(b)'s and (b')'s tensors through system shared memory regions registered with "
        "the server (zero-copy on one host; a client on another host cannot use it): "
        "perf_analyzer --shared-memory=system, medimg's client BenchOptions.shared_memory",
    )
    p.add_argument("--batch-sizes", type=parse_sizes, default=BATCH_SIZES, help="in-process sweep")
    p.add_argument("--sweep-s", type=float, default=2.0, help="seconds per in-process size")
    p.add_argument("--latency-runs", type=int, default=500, help="in-process batch-1 runs")
    p.add_argument("--rounds", type=int, default=4, help="rounds over (a), (b), (c)")
    p.add_argument(
        "--quiet-cpu",
        type=float,
        default=0.2,
        help="ratios from the rounds in which other processes took at most this many cores",
    )
    repo = p.add_argument_group(
        "repository options (when this script writes the repository; defaults: "
        "serving.repository.model_config.RepositoryOptions(), what medimg export writes)"
    )
    repo.add_argument("--max-queue-delay-us", type=int)
    repo.add_argument("--preferred-batch-sizes", type=parse_sizes)
    repo.add_argument("--instances", type=int)
    repo.add_argument("--intra-op-threads", type=int)
    repo.add_argument("--max-batch-size", type=int)
    repo.add_argument("--borrow-idle-cores", type=int, choices=(0, 1))
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    given = [k for k in REPOSITORY_FLAGS if getattr(args, k) is not None]
    if args.model_repository and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        p.error(
            f"{flags}: only apply when this script writes the repository (no --model-repository)"
        )
    for key, value in repository_defaults().items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.perf_analyzer and args.load_generator != "perf_analyzer":
        p.error("--perf-analyzer: only with --load-generator perf_analyzer")
    if args.weights and not args.model_repository:
        p.error("--weights: only with --model-repository (otherwise the model is made here)")
    if args.concurrency < 1 or args.rounds < 1 or args.duration_s <= 0 or args.warmup_s < 0:
        p.error("--concurrency and --rounds must be >= 1, --duration-s > 0, --warmup-s >= 0")
    if not args.data_dir:
        from training.config import default_data_dir

        args.data_dir = default_data_dir()
    return args


def loads(
    prepared: Prepared, images: np.ndarray, args: argparse.Namespace, workdir: Path, url: str
) -> tuple:
    """``(load, client_load)`` for :func:`serving_report.measure_round`: (b) through
    perf_analyzer and (b') through medimg's client, or (b) through medimg's client alone."""
    client = partial(triton_level, url, prepared.classifier, args)
    if args.load_generator == "medimg":
        return client, None
    pa = locate(args.perf_analyzer)
    prepared.notes.append(f"(b) load generator: {pa.version()} ({pa.binary})")
    print(f"  {prepared.notes[-1]}", flush=True)
    data = write_input(images, prepared.spec.input_name, workdir / "perf_analyzer_input.json")
    return partial(pa_level, pa, url, prepared.classifier, args, input_json=data), partial(
        triton_level, url, prepared.classifier, args, label="(b')"
    )


def run_rounds(
    prepared: Prepared, images: np.ndarray, best: int, args: argparse.Namespace, workdir: Path
) -> list[Round]:
    """Both servers up (idle between their turns), then ``--rounds`` rounds."""
    sessions = (
        ort_session(prepared.onnx_path),
        [ort_session(prepared.onnx_path, 1) for _ in range(os.cpu_count() or 1)],
    )
    rounds = []
    with (
        triton_server(prepared.repository, args.protocol) as triton_url,
        naive_server(prepared.weights, workdir) as naive_url,
    ):
        load = loads(prepared, images, args, workdir, triton_url)
        for i in range(1, args.rounds + 1):
            print(f"round {i}/{args.rounds}", flush=True)
            one = measure_round(sessions, images, best, (triton_url, naive_url), load, args)
            for row in one.rows():
                print(f"  {row_text(row)}", flush=True)
            print(f"  {last_line(one.ratios())} (others' CPU {one.others_cpu():.2f})", flush=True)
            rounds.append(one)
    return rounds


def run(args: argparse.Namespace, workdir: Path) -> dict:
    """Prepare the model, sweep (a), then rounds of (a), (b), (c); table, ratios, report."""
    load_before = os.getloadavg()[0]
    prepared, images = prepare(args, workdir)
    for note in prepared.notes:
        print(f"note: {note}", flush=True)
    print("(a) ONNX Runtime in process: batch-size sweep", flush=True)
    sweep = inprocess_sweep(ort_session(prepared.onnx_path), images, args.batch_sizes, args.sweep_s)
    if not sweep:
        raise BenchError(f"{prepared.onnx_path}: no batch size of {args.batch_sizes} ran")
    best = max(sweep, key=lambda r: r.throughput).batch_size
    print(
        f"(a) best batch {best}; rounds of (a), (b) Triton {args.protocol} "
        f"({args.load_generator}) on {prepared.classifier}, (c) naive",
        flush=True,
    )
    rounds = run_rounds(prepared, images, best, args, workdir)
    used = quiet_rounds(rounds, args.quiet_cpu)
    rows = summary_rows(used)
    values = median_ratios(used)
    which = (
        f"the {len(used)} of {len(rounds)} rounds in which other processes took at most "
        f"{args.quiet_cpu} cores"
        if len(used) < len(rounds) or all(r.others_cpu() <= args.quiet_cpu for r in rounds)
        else f"all {len(rounds)} rounds (none had other processes at <= {args.quiet_cpu} cores)"
    )
    lines = [
        f"medians over {which}; throughput ratios are the medians of the per-round ratios "
        "((a) measured before and after (b) in every round); p99 over every request of "
        "those rounds pooled",
        table(rows),
        "",
        *ratio_lines(values),
        *client_lines(used),
        "per-round range: "
        + ", ".join(f"{k} {lo:.2f}..{hi:.2f}" for k, (lo, hi) in spread(used).items()),
        f"{'served/inprocess_par':<20} "
        f"{float(np.median([r.parallel_ratio() for r in used])):6.3f}  (information: against "
        "(a'), one-thread sessions side by side, no target)",
    ]
    print("\n" + "\n".join(lines), flush=True)
    report = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}",
        "load_average": [load_before, os.getloadavg()[0]],
        "options": vars(args),
        "repository_options": config_summary(prepared.repository, prepared.classifier)
        if args.model_repository
        else options_summary(repository_options(args)),
        "notes": prepared.notes,
        "inprocess_sweep": [r.public() for r in sweep],
        "rows": [r.public() for r in rows],
        "rounds": [
            {
                **{
                    f.name: getattr(r, f.name).public()
                    for f in fields(r)
                    if getattr(r, f.name) is not None
                },
                "ratios": r.ratios(),
                "quiet": r in used,
                "others_cpu": r.others_cpu(),
            }
            for r in rounds
        ],
        "ratios": values,
        "last_line": last_line(values),
    }
    out_dir = Path(args.results_dir)
    write_results(out_dir, report, markdown(report, rows, [*lines, last_line(values)]))
    print(f"results: {out_dir}/serving.{{json,md,csv}}", flush=True)
    print(last_line(values), flush=True)
    return report


def unshadow_serving_package() -> None:
    """Run as ``python benchmarks/serving.py``, this file's folder comes first on
    ``sys.path`` and this module would hide the ``serving`` package: drop that entry. The
    sibling modules (``serving_model`` ...) are imported at the top of this file, before
    this runs, and import the ``serving`` package only inside their functions."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]


def main(argv: list[str] | None = None) -> int:
    unshadow_serving_package()
    args = parse_args(argv)
    from training.errors import MedimgError

    with tempfile.TemporaryDirectory(prefix="medimg-serving-bench-") as tmp:
        try:
            run(args, Path(tmp))
        except (BenchError, MedimgError) as exc:
            print(f"serving benchmark: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
