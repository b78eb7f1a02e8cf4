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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.aio_client import AsyncTritonClassifier
from serving.client import PROTOCOLS, ModelContract, Prediction
from serving.inputs import Item, collect_items
from serving.repository import check_writable, write_atomic
from training.errors import ConfigError
from training.images import DICOM_IDS


def add_client_options(p: argparse.ArgumentParser) -> None:
    """The options every client command shares, with the same meaning and defaults."""
    p.add_argument("paths", nargs="+", help="image files (PNG, JPEG, DICOM, .npy), "
                   "directories, or MedMNIST .npz files")  # fmt: skip
    p.add_argument("--url", default="",
                   help="HOST:PORT (default 127.0.0.1:8000 for http, :8001 for grpc)")  # fmt: skip
    p.add_argument("--protocol", choices=PROTOCOLS, default="http")
    p.add_argument("--model", default="",
                   help="ensemble name (default: the only ensemble on the server)")  # fmt: skip
    p.add_argument("--client-preprocess", action="store_true",
                   help="decode and preprocess here and send tensors (default: send the "
                   "files' bytes to the server-side preprocessing ensemble)")  # fmt: skip
    p.add_argument("--split", default="", help=".npz inputs: train|val|test (default test)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="images per request (default: the model's max_batch_size)")  # fmt: skip
    p.add_argument("--in-flight", type=int, default=2, help="requests in flight (default 2)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request (default 60)")


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
        client = AsyncTritonClassifier(args.url, args.protocol, args.model, args.timeout_s,
                                       client_preprocess=args.client_preprocess)  # fmt: skip
        async with client:
            contract = client._contract
            if check is not None:
                check(contract)
            for warning in dataset_warnings(args.paths, contract):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
            with _progress(len(items), desc) as bar:
                preds = await client.classify_all(
                    items, batch_size=args.batch_size, in_flight=args.in_flight,
                    on_done=bar.update,
                )  # fmt: skip
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


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def prob_columns(class_names: Sequence[str]) -> list[str]:
    return [f"prob_{name}" for name in class_names]


def cmd_classify(args: argparse.Namespace) -> int:
    run = run_client(args, "classify")
    if args.csv:
        names = run.contract.spec.class_names
        rows = [[p.file, p.label, f"{p.probability:.6f}", *(f"{p.probabilities[n]:.6f}"
                 for n in names)] for p in run.ok]  # fmt: skip
        sys.stdout.write(_csv_text(["file", "label", "probability", *prob_columns(names)], rows))
    else:
        for p in run.ok:
            print(p.as_json() if args.json else p.as_text())
    sys.stdout.flush()
    return finish(run.errors, run.total)


def cmd_label(args: argparse.Namespace) -> int:
    if not 0.0 <= args.review_below <= 1.0:
        raise ConfigError(
            f"--review-below: expected a probability in [0, 1], got {args.review_below}"
        )
    check_writable(Path(args.out).parent, f"--out {args.out}")
    run = run_client(args, "label")
    names = run.contract.spec.class_names
    rows = []
    for p in run.ok:
        review = p.probability < args.review_below
        rows.append([p.file, p.label, f"{p.probability:.6f}", "true" if review else "false",
                     *(f"{p.probabilities[n]:.6f}" for n in names)])  # fmt: skip
    header = ["file", "label", "probability", "needs_review", *prob_columns(names)]
    out = Path(args.out)
    write_atomic(out, _csv_text(header, rows).encode())
    counts = Counter(p.label for p in run.ok)
    review = sum(1 for r in rows if r[3] == "true")
    print(f"labelled {len(rows)} image(s) into {out}")
    for name in names:
        print(f"  {name:<24} {counts.get(name, 0):>7}")
    print(f"  needs review (p < {args.review_below:.2f}): {review}")
    return finish(run.errors, run.total)


def _finding(name: str, class_names: Sequence[str], model: str) -> str:
    for known in class_names:
        if known.lower() == name.lower():
            return known
    raise ConfigError(f"--finding {name!r}: model {model!r} has classes {list(class_names)}")


def cmd_triage(args: argparse.Namespace) -> int:
    finding = args.finding

    def check(contract: ModelContract) -> None:
        nonlocal finding
        finding = _finding(args.finding, contract.spec.class_names, contract.model)

    if args.out:
        check_writable(Path(args.out).parent, f"--out {args.out}")
    run = run_client(args, "triage", check)
    ranked = sorted(run.ok, key=lambda p: (-p.probabilities[finding], p.file))
    if args.top:
        ranked = ranked[: args.top]
    id_fields = DICOM_IDS.split()
    by_file = {i.name: i for i in run.items}
    rows = []
    for rank, p in enumerate(ranked, 1):
        ids = _ids(by_file.get(p.file))
        rows.append([rank, p.file, f"{p.probabilities[finding]:.6f}", p.label,
                     *(ids.get(f, "") for f in id_fields)])  # fmt: skip
    text = _csv_text(["rank", "file", f"prob_{finding}", "label", *id_fields], rows)
    if args.out:
        out = Path(args.out)
        write_atomic(out, text.encode(), mode=0o600)  # may hold patient identifiers
        # identifiers go to the worklist only, never to the terminal or a log
        print(f"{len(rows)} stud(ies) ordered by P({finding}) into {out}")
    else:
        sys.stdout.write(text)
    return finish(run.errors, run.total)


def _ids(item: Item | None) -> dict[str, str]:
    if item is None:
        return {}
    try:
        return item.dicom_ids()
    except Exception:  # the identifiers are optional; the image itself was classified
        return {}


def add_parsers(sub) -> None:
    p = sub.add_parser("classify", help="classify images through a running Triton server")
    add_client_options(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per line")
    fmt.add_argument("--csv", action="store_true", help="CSV with one column per class")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("label", help="auto-label unlabelled images into a CSV (with review flags)")
    add_client_options(p)
    p.add_argument("--out", required=True, help="labels CSV to write (e.g. labels.csv)")
    p.add_argument("--review-below", type=float, default=0.9,
                   help="flag predictions whose probability is below P (default %(default)s)")  # fmt: skip
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("triage", help="order studies by the predicted probability of a finding")
    add_client_options(p)
    p.add_argument("--finding", required=True, help="a class of the model, e.g. pneumonia")
    p.add_argument("--out", default="", help="worklist CSV (default: print it)")
    p.add_argument("--top", type=int, default=0, help="keep the K most likely (0: all)")
    p.set_defaults(func=cmd_triage)
