"""Where a served request's CPU goes, beside in-process ONNX Runtime, in one script.

CPU per served request by process (perf_analyzer, tritonserver, Python-backend stubs) for
the exported classifier and a zero-work copy, beside in-process ONNX Runtime per image;
how it is measured: :mod:`serving.perf.comparison.cpu_split`::

    python benchmarks/serving_cpu_split.py --model-repository model_repository

``served/inprocess >= 0.90`` (``benchmarks/serving_side_by_side.py``) needs a served request
to cost at most ``cores / (0.9 x in-process best img/s)`` core-ms, load generator included;
the last lines print that budget beside what the served path spends outside ONNX Runtime.
Results go to ``serving_cpu_split.md`` in
``--out`` (default ``bench-results/serving-cpu-split-TIME``), and with ``--record`` to
``benchmarks/results/serving_cpu_split.md`` too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from serving.perf.accounting import BenchError
from serving.perf.comparison.cpu_split import CpuSplitOptions, run
from serving.perf.comparison.output import destinations, run_folder, write_text
from training.errors import MedimgError

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--model", default="", help="the classifier (NAME or NAME_onnx)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration-s", type=float, default=6.0, help="per perf_analyzer run")
    p.add_argument("--seconds", type=float, default=1.5, help="per in-process measurement")
    p.add_argument("--perf-analyzer", default="", help="its binary (default: found/fetched)")
    p.add_argument(
        "--out",
        default="",
        help="folder for serving_cpu_split.md (default: a new "
        "bench-results/serving-cpu-split-TIME under the current directory)",
    )
    p.add_argument(
        "--record", action="store_true", help="also write benchmarks/results/serving_cpu_split.md"
    )
    args = p.parse_args(argv)
    if args.rounds < 1 or args.concurrency < 1 or args.duration_s <= 0 or args.seconds <= 0:
        p.error("--rounds and --concurrency must be >= 1, --duration-s and --seconds > 0")
    args.out = args.out or str(run_folder("serving-cpu-split"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        folders = destinations(args.out, RESULTS_DIR if args.record else None)
        with tempfile.TemporaryDirectory(prefix="medimg-cpu-split-") as tmp:
            options = CpuSplitOptions(
                model_repository=args.model_repository,
                model=args.model,
                rounds=args.rounds,
                concurrency=args.concurrency,
                duration_s=args.duration_s,
                seconds=args.seconds,
                perf_analyzer=args.perf_analyzer,
            )
            lines = run(options, Path(tmp))
    except (BenchError, MedimgError) as exc:
        print(f"serving CPU split: {exc}", file=sys.stderr)
        return 2
    paths = write_text(folders, "serving_cpu_split.md", "\n".join(lines) + "\n")
    print("written to " + ", ".join(map(str, paths)))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
