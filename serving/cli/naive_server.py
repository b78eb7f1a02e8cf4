"""The side-by-side serving benchmark's naive baseline (FastAPI + PyTorch eager,
``serving.perf.comparison.naive_server``) as its own process, stopped by its PID::

    python -m serving.cli.naive_server --weights /tmp/densenet.pt --port 8500
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        "python -m serving.cli.naive_server", description=__doc__.split(" (")[0]
    )
    parser.add_argument("--weights", required=True, help="file written by save_weights")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    args = parser.parse_args(argv)
    weights = Path(args.weights)
    if not weights.is_file():
        print(f"naive_server: weights file {weights} does not exist", file=sys.stderr)
        return 2
    from serving.perf.comparison.naive_server import serve  # torch: only once the flags are good

    serve(weights, args.host, args.port, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
