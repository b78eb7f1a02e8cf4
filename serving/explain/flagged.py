"""``label --explain DIR`` and ``triage --explain DIR``: the CAM overlay of every image
flagged for review (the map of its predicted class) / every study on the worklist (the
map of the finding it was ranked by), through the same server::

    medimg label ../shared/data/pneumoniamnist.npz --split test --out labels.csv \
        --target-accuracy 0.95 --explain review/
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from serving.clients.commands import ClientRun
from serving.clients.contract import ModelContract
from serving.explain.maps import no_cam_message
from serving.explain.overlay import write_overlays
from serving.repository.layout import check_writable
from training.errors import ServingError


def check_explain_dir(directory: str) -> None:
    """Before any image is sent: the overlay directory (or its parent) must be writable."""
    path = Path(directory)
    check_writable(path if path.exists() else path.parent, f"--explain {directory}")


def needing_maps(
    args: Any, check: Callable[[ModelContract], None] | None = None
) -> Callable[[ModelContract], None] | None:
    """``check`` (run on the model's contract before any image is sent) preceded, with
    ``--explain``, by: the model returns class activation maps."""
    if not args.explain:
        return check

    def both(contract: ModelContract) -> None:
        if not contract.cam_name:
            where = f" on {args.url}"
            raise ServingError(f"--explain: {no_cam_message(contract.model, where)}; nothing sent")
        if check is not None:
            check(contract)

    return both


def explain_files(
    args: Any, run: ClientRun, files: Sequence[str], class_name: str = ""
) -> list[str]:
    """Overlays of the items named ``files`` into ``args.explain``, of ``class_name``'s map
    ("": each item's predicted class); returns the errors."""
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
        explained = write_overlays(
            client, items, args.explain, class_name=class_name, batch_size=args.batch_size
        )
    written = sum(1 for e in explained if e.path is not None)
    print(f"  overlays: {written} of {len(items)} into {args.explain}", file=sys.stderr)
    return [e.error for e in explained if e.error]
