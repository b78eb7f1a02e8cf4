"""``medimg``: the one command-line tool.

medimg train --dataset pneumoniamnist --epochs 3
medimg export --model pneumoniamnist-densenet121
medimg serve --model-control-mode explicit
medimg publish --model pneumoniamnist-densenet121@champion --url 127.0.0.1:8000
medimg classify ../shared/data/samples --protocol grpc
medimg label ../shared/data/pneumoniamnist.npz --out labels.csv
medimg triage ../shared/data/samples --finding pneumonia
medimg pipeline --dataset pneumoniamnist --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from training.errors import MedimgError


def build_parser() -> argparse.ArgumentParser:
    from serving.cli import audit, card, classify, explain, export, perf, serve, train, triage

    parser = argparse.ArgumentParser(
        prog="medimg",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (train, export, serve, classify, triage, explain, perf, card, audit):
        group.register(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("training", "serving"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except MedimgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
