"""Served against in-process against naive: one exported DenseNet-121, three ways, one run.

(a) ONNX Runtime in this process at its best batch size (a sweep), plus batch-1 latency;
(b) our Triton server (the embedded ``tritonserver``, started here on free loopback ports)
    with single-image requests to the classifier ``NAME_onnx`` (preprocessed float
    tensors: the same work as (a)) at concurrency 16 for throughput and at concurrency 1
    for p99. The load comes from NVIDIA's perf_analyzer
    (``serving.perf.perf_analyzer``: found on PATH or in medimg's cache, else fetched from
    the package registry), the tool Triton's own numbers are quoted with; (b'), measured
    right after (b) in the same brackets, is the same load from medimg's Python client
    (:func:`serving.perf.bench.run_bench`), for information. ``--load-generator medimg``
    makes medimg's client (b) and drops (b');
(c) a naive baseline: FastAPI + PyTorch eager, one request one forward pass
    (``serving/perf/comparison/naive_server.py``, its own uvicorn process stopped by its
    PID), driven by an asyncio aiohttp client with the same concurrency and duration as (b).

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
``served/inprocess=R1 served/naive=R2 p99c1/inprocess_b1=R3``. Results go to a folder of
their own, ``--out`` (default ``bench-results/serving-TIME`` under the current directory):
``serving.{json,md}`` and ``serving.csv`` with the run's row. ``--record`` also writes them
into ``benchmarks/results/`` (or ``--results-dir``), the row appended to its ``serving.csv``.

With no ``--model-repository`` the model is made here through the real code path:
DenseNet-121 for the data set's spec, a few training steps of ``training.epoch.run_epoch``
(``--train-steps 0`` skips them: speed does not depend on weight values),
``serving.export.onnx.export_onnx`` and ``serving.repository.layout.write_model_set`` into a
temporary directory, with the repository options below. Their defaults are
``serving.repository.model_config.RepositoryOptions()``, what ``medimg export`` writes (settings
chosen with ``benchmarks/serving_sweep.py``), so this measures the exported product; the
options override them. This script is the command line; the work is in
``serving.perf.comparison``: ``side_by_side`` (the run), ``model`` (the model), ``paths``
(the measured paths), ``report`` (rounds and report), ``output`` (where results go), with
``serving.perf.perf_analyzer`` (the load generator) and ``serving.perf.accounting`` (the
row, the error, others' CPU)::

    python benchmarks/serving_side_by_side.py --data-dir ../shared/data --record
    python benchmarks/serving_side_by_side.py --data-dir ../shared/data \
        --model-repository model_repository --weights model.pt --protocol http \
        --duration-s 20 --load-generator medimg --out /tmp/serving-http
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from serving.perf.accounting import BenchError
from serving.perf.comparison.output import destinations, run_folder
from serving.perf.comparison.settings import REPOSITORY_FLAGS, Settings, command_line_defaults
from serving.perf.comparison.side_by_side import run, save
from training.errors import MedimgError

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
    p.add_argument("--dataset")
    p.add_argument("--data-dir", default="", help="folder holding <dataset>.npz")
    p.add_argument("--image-size", type=int)
    p.add_argument("--model-repository", default="", help="reuse this repository")
    p.add_argument("--model", default="", help="classifier in --model-repository (NAME)")
    p.add_argument("--weights", default="", help="save_weights file for the naive baseline")
    p.add_argument("--train-steps", type=int, help="batch-32 steps; 0: no training")
    p.add_argument("--duration-s", type=float)
    p.add_argument("--warmup-s", type=float)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--protocol", choices=("grpc", "http"))
    p.add_argument(
        "--load-generator",
        choices=("perf_analyzer", "medimg"),
        help="(b)'s load: NVIDIA's perf_analyzer (fetched into medimg's cache when not on "
        "PATH), with (b') medimg's Python client beside it for information; or medimg's "
        "Python client alone (serving.perf.bench.run_bench)",
    )
    p.add_argument("--perf-analyzer", default="", help="path of a perf_analyzer binary to use")
    p.add_argument(
        "--shared-memory",
        choices=("none", "system"),
        help="(b)'s and (b')'s tensors through system shared memory regions registered with "
        "the server (zero-copy on one host; a client on another host cannot use it): "
        "perf_analyzer --shared-memory=system, medimg's client BenchOptions.shared_memory",
    )
    p.add_argument("--batch-sizes", type=parse_sizes, help="in-process sweep")
    p.add_argument("--sweep-s", type=float, help="seconds per in-process size")
    p.add_argument("--latency-runs", type=int, help="in-process batch-1 runs")
    p.add_argument("--rounds", type=int, help="rounds over (a), (b), (c)")
    p.add_argument(
        "--quiet-cpu",
        type=float,
        help="ratios from the rounds in which other processes took at most this many cores",
    )
    p.set_defaults(**command_line_defaults())
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
    p.add_argument(
        "--out",
        default="",
        help="folder for this run's results "
        "(default: a new bench-results/serving-TIME under the current directory)",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="also record the results in --results-dir (serving.json and .md "
        "replaced, the row appended to serving.csv)",
    )
    p.add_argument(
        "--results-dir",
        default=str(RESULTS_DIR),
        help="where --record records (default: benchmarks/results)",
    )
    args = p.parse_args(argv)
    given = [k for k in REPOSITORY_FLAGS if getattr(args, k) is not None]
    if args.model_repository and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        p.error(
            f"{flags}: only apply when this script writes the repository (no --model-repository)"
        )
    if args.perf_analyzer and args.load_generator != "perf_analyzer":
        p.error("--perf-analyzer: only with --load-generator perf_analyzer")
    if args.weights and not args.model_repository:
        p.error("--weights: only with --model-repository (otherwise the model is made here)")
    if args.concurrency < 1 or args.rounds < 1 or args.duration_s <= 0 or args.warmup_s < 0:
        p.error("--concurrency and --rounds must be >= 1, --duration-s > 0, --warmup-s >= 0")
    if args.results_dir != str(RESULTS_DIR) and not args.record:
        p.error("--results-dir: only with --record (this run's results go to --out)")
    if not args.data_dir:
        from training.config import default_data_dir

        args.data_dir = default_data_dir()
    args.out = args.out or str(run_folder("serving"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        folders = destinations(args.out, args.results_dir if args.record else None)
        with tempfile.TemporaryDirectory(prefix="medimg-serving-bench-") as tmp:
            report, text = run(Settings.from_options(vars(args)), Path(tmp))
    except (BenchError, MedimgError) as exc:
        print(f"serving benchmark: {exc}", file=sys.stderr)
        return 2
    save(report, text, folders)
    for folder in folders:
        print(f"results: {folder}/serving.{{json,md,csv}}", flush=True)
    print(report["last_line"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
