"""Single-image classification latency through Triton, HTTP vs gRPC, beside in-process ONNX Runtime.

Starts the embedded tritonserver on free loopback ports over an exported
repository, then, side by side in this one process: one image per request through
:class:`serving.clients.sync.TritonClassifier` (read + preprocess + infer), the same
file read, preprocessed and run through ONNX Runtime in process, and the whole
``medimg classify`` command (process start included). The work is
``serving.perf.comparison.classify_latency``; it prints its results and writes no file::

    python benchmarks/classify_latency.py --repository model_repository \
        --image ../shared/data/samples/00000001_000.png --requests 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.perf.accounting import BenchError
from serving.perf.comparison.classify_latency import measure
from training.errors import MedimgError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--image", default="../shared/data/samples/00000001_000.png")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--cli-runs", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        lines = measure(Path(args.repository), args.image, args.requests, args.cli_runs)
    except (BenchError, MedimgError) as exc:
        print(f"classify latency: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
