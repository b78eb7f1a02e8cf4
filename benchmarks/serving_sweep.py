"""Tuning evidence for ``benchmarks/serving_side_by_side.py``: the served path under several
Triton repository settings, side by side in one run, each against in-process ONNX Runtime
measured right before it.

Every configuration gets its own repository (same ONNX file) and its own tritonserver,
all started first and idle between their turns; then ``--passes`` passes go round
robin over them: in-process best batch, Triton at concurrency N, in-process batch-1
latency, Triton at concurrency 1. The ratios are the medians over passes. A
configuration named ``...+nospin`` serves through a copy of the Python backend with
ONNX Runtime's intra-op spin-waiting off (``session.intra_op.allow_spinning=0``): an
experiment on a temporary copy, not a change to ``serving/triton_backend/model.py``.
The configurations and the sweep are ``serving.perf.comparison.sweep``. The table goes to
``serving_sweep.md`` in ``--out`` (default ``bench-results/serving-sweep-TIME``), and with
``--record`` to ``benchmarks/results/serving_sweep.md`` too::

    python benchmarks/serving_sweep.py --data-dir ../shared/data --model-repository model_repository
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from serving.perf.accounting import BenchError
from serving.perf.comparison.output import destinations, run_folder, write_text
from serving.perf.comparison.sweep import SweepOptions, run_sweep
from training.errors import MedimgError

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--model-repository", required=True, help="source of the ONNX model")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=4.0)
    parser.add_argument("--only", default="", help="comma-separated config indices")
    parser.add_argument("--quiet-cpu", type=float, default=0.2, help="see serving_side_by_side.py")
    parser.add_argument(
        "--out",
        default="",
        help="folder for serving_sweep.md (default: a new bench-results/serving-sweep-TIME "
        "under the current directory)",
    )
    parser.add_argument(
        "--record", action="store_true", help="also write benchmarks/results/serving_sweep.md"
    )
    args = parser.parse_args(argv)
    args.out = args.out or str(run_folder("serving-sweep"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        folders = destinations(args.out, RESULTS_DIR if args.record else None)
        with tempfile.TemporaryDirectory(prefix="medimg-serving-sweep-") as tmp:
            ours = SweepOptions(
                model_repository=args.model_repository,
                data_dir=args.data_dir,
                passes=args.passes,
                duration_s=args.duration_s,
                only=args.only,
                quiet_cpu=args.quiet_cpu,
            )
            lines = run_sweep(ours, Path(tmp))
    except (BenchError, MedimgError) as exc:
        print(f"serving sweep: {exc}", file=sys.stderr)
        return 2
    paths = write_text(folders, "serving_sweep.md", "\n".join(lines) + "\n")
    print("written to " + ", ".join(map(str, paths)))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
