"""``medimg classify``, ``medimg label`` and ``medimg triage``: images in, through a
running Triton server (the asyncio client), predictions out.

Every command takes files, directories (walked for PNG, JPEG, DICOM, ``.npy``) and
MedMNIST ``.npz`` files (one split), the same ``--url/--protocol/--model`` options,
shows a progress bar on a terminal, collects per-file errors and summarises them at
the end with a non-zero exit::

    medimg classify ../shared/data/samples --protocol grpc --csv
    medimg label ../shared/data/pneumoniamnist.npz --split test --out labels.csv --review-below 0.9
    medimg triage ../shared/data/samples --finding pneumonia --out worklist.csv
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.clients.aio import AsyncTritonClassifier
from serving.clients.contract import ModelContract, Prediction
from serving.clients.inputs import Item, collect_items
from training.errors import ConfigError


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # a bar on a terminal only (disable=None), so logs and pipes stay clean
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False)


@dataclass
class ClientRun:
    items: list[Item]
    predictions: list[Prediction]  # one per item, in order; failed ones carry .error
    path_errors: list[str]  # paths that gave no item (a missing split, an empty directory)
    contract: ModelContract

    @property
    def ok(self) -> list[Prediction]:
        return [p for p in self.predictions if not p.error]

    @property
    def errors(self) -> list[str]:
        return self.path_errors + [p.error for p in self.predictions if p.error]

    @property
    def total(self) -> int:
        return len(self.predictions) + len(self.path_errors)


def dataset_warnings(paths: Sequence[str], contract: ModelContract) -> list[str]:
    """One line per ``.npz`` argument named after another MedMNIST data set than the one
    the model was trained on (``breastmnist.npz``, ``breastmnist_64.npz``)."""
    npzs = [Path(p) for p in paths if str(p).endswith(".npz")]
    if not npzs:
        return []
    from training.data import known_datasets  # imports torch: only when there is an .npz

    flags, trained_on = set(known_datasets()), contract.spec.dataset
    if trained_on not in flags:
        return []
    warnings = []
    for path in npzs:
        flag = re.sub(r"_(64|128|224)$", "", path.stem.lower())
        if flag in flags and flag != trained_on:
            warnings.append(
                f"{path.name} holds MedMNIST's {flag}, but {contract.model} was trained on "
                f"{trained_on}: its labels are {list(contract.spec.class_names)}, not {flag}'s"
            )
    return warnings


def run_client(
    args: argparse.Namespace, desc: str, check: Callable[[ModelContract], None] | None = None
) -> ClientRun:
    """Classify ``args.paths`` through the server; ``check`` vets the model's contract
    before any image is sent."""
    if args.batch_size < 0 or args.in_flight < 1:
        raise ConfigError("--batch-size must be >= 0 and --in-flight >= 1")
    items, errors = collect_items(args.paths, args.split)

    async def go() -> tuple[list[Prediction], ModelContract]:
        client = AsyncTritonClassifier(
            args.url,
            args.protocol,
            args.model,
            args.timeout_s,
            client_preprocess=args.client_preprocess,
            threshold=getattr(args, "threshold", None),
        )
        async with client:
            contract = client.contract
            if check is not None:
                check(contract)
            for warning in dataset_warnings(args.paths, contract):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
            with _progress(len(items), desc) as bar:
                preds = await client.classify_all(
                    items, batch_size=args.batch_size, in_flight=args.in_flight, on_done=bar.update
                )
            return preds, contract

    predictions, contract = asyncio.run(go())
    return ClientRun(items, predictions, errors, contract)


def finish(errors: Sequence[str], total: int) -> int:
    """Print the per-file errors together; exit code 1 when there were any."""
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        print(f"error: {len(errors)} of {total} input(s) failed", file=sys.stderr)
    return 1 if errors else 0


def csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A CSV document (``\n`` line ends) of ``header`` and ``rows``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def prob_columns(class_names: Sequence[str]) -> list[str]:
    """One ``prob_<class>`` column name per class."""
    return [f"prob_{name}" for name in class_names]


def dicom_ids_of(item: Item | None) -> dict[str, str]:
    """The DICOM identifiers of ``item``'s file; {} when there are none or none readable."""
    if item is None:
        return {}
    try:
        return item.dicom_ids()
    except Exception:  # the identifiers are optional; the image itself was classified
        return {}
