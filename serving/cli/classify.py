"""``medimg classify``, ``medimg label`` and ``medimg triage``: images in, through a
running Triton server, predictions out.

    medimg classify ../shared/data/samples --protocol grpc --csv
    medimg label ../shared/data/pneumoniamnist.npz --split test --out labels.csv --review-below 0.9
    medimg triage ../shared/data/samples --finding pneumonia --out worklist.csv
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from serving.cli.options import add_client_options
from serving.clients.commands import csv_text, dicom_ids_of, finish, prob_columns, run_client
from serving.clients.contract import ModelContract
from serving.repository.layout import check_writable, write_atomic
from training.errors import ConfigError
from training.images import DICOM_IDS


def cmd_classify(args: argparse.Namespace) -> int:
    run = run_client(args, "classify")
    if args.csv:
        names = run.contract.spec.class_names
        rows = [
            [p.file, p.label, f"{p.probability:.6f}", *(f"{p.probabilities[n]:.6f}" for n in names)]
            for p in run.ok
        ]
        sys.stdout.write(csv_text(["file", "label", "probability", *prob_columns(names)], rows))
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
        rows.append(
            [
                p.file,
                p.label,
                f"{p.probability:.6f}",
                "true" if review else "false",
                *(f"{p.probabilities[n]:.6f}" for n in names),
            ]
        )
    header = ["file", "label", "probability", "needs_review", *prob_columns(names)]
    out = Path(args.out)
    write_atomic(out, csv_text(header, rows).encode())
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
        ids = dicom_ids_of(by_file.get(p.file))
        rows.append(
            [
                rank,
                p.file,
                f"{p.probabilities[finding]:.6f}",
                p.label,
                *(ids.get(f, "") for f in id_fields),
            ]
        )
    text = csv_text(["rank", "file", f"prob_{finding}", "label", *id_fields], rows)
    if args.out:
        out = Path(args.out)
        write_atomic(out, text.encode(), mode=0o600)  # may hold patient identifiers
        # identifiers go to the worklist only, never to the terminal or a log
        print(f"{len(rows)} stud(ies) ordered by P({finding}) into {out}")
    else:
        sys.stdout.write(text)
    return finish(run.errors, run.total)


def register(sub) -> None:
    p = sub.add_parser("classify", help="classify images through a running Triton server")
    add_client_options(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per line")
    fmt.add_argument("--csv", action="store_true", help="CSV with one column per class")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("label", help="auto-label unlabelled images into a CSV (with review flags)")
    add_client_options(p)
    p.add_argument("--out", required=True, help="labels CSV to write (e.g. labels.csv)")
    p.add_argument(
        "--review-below",
        type=float,
        default=0.9,
        help="flag predictions whose probability is below P (default %(default)s)",
    )
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("triage", help="order studies by the predicted probability of a finding")
    add_client_options(p)
    p.add_argument("--finding", required=True, help="a class of the model, e.g. pneumonia")
    p.add_argument("--out", default="", help="worklist CSV (default: print it)")
    p.add_argument("--top", type=int, default=0, help="keep the K most likely (0: all)")
    p.set_defaults(func=cmd_triage)
