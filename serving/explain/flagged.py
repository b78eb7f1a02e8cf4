"""``label --explain DIR`` and ``triage --explain DIR``: the CAM overlay of every image
flagged for review / every study on the worklist, through the same server::

    medimg label ../shared/data/pneumoniamnist.npz --split test --out labels.csv \
        --target-accuracy 0.95 --explain review/
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serving.clients.commands import ClientRun
from serving.explain.overlay import write_overlays
from serving.repository.layout import check_writable


def check_explain_dir(directory: str) -> None:
    """Before any image is sent: the overlay directory (or its parent) must be writable."""
    path = Path(directory)
    check_writable(path if path.exists() else path.parent, f"--explain {directory}")


def explain_files(args: Any, run: ClientRun, files: Sequence[str]) -> list[str]:
    """Overlays of the items named ``files`` into ``args.explain``; returns the errors."""
    from serving.clients.sync import TritonClassifier

    by_name = {item.name: item for item in run.items}
    items = [by_name[f] for f in files if f in by_name]
    if not items:
        print(f"  overlays: none to write into {args.explain}", file=sys.stderr)
        return []
    with TritonClassifier(
        args.url,
        args.protocol,
        args.model,
        args.timeout_s,
        client_preprocess=args.client_preprocess,
    ) as client:
        explained = write_overlays(client, items, args.explain, batch_size=args.batch_size)
    written = sum(1 for e in explained if e.path is not None)
    print(f"  overlays: {written} of {len(items)} into {args.explain}", file=sys.stderr)
    return [e.error for e in explained if e.error]
