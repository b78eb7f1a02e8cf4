"""``medimg triage``: studies through a running Triton server, ordered by the predicted
probability of a finding, with guaranteed urgent/routine buckets when asked::

    medimg triage ../shared/data/samples --finding pneumonia --out worklist.csv
    medimg triage ../shared/data/samples --target-ppv 0.9 --target-npv 0.98 --out worklist.csv

With a target, the thresholds come from the review statistics in the model's spec
(training.review) and are chosen before any image is sent.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from serving.cli.guarantee import (
    add_delta,
    delta_of,
    guarantee,
    model_review_statistics,
    probability,
    sidecar,
    unreachable,
)
from serving.cli.options import add_client_options
from serving.clients.commands import csv_text, dicom_ids_of, finish, run_client
from serving.clients.contract import ModelContract
from serving.explain.flagged import check_explain_dir, explain_files, needing_maps
from serving.repository.layout import check_writable, write_atomic
from training.errors import ConfigError
from training.images import DICOM_IDS

if TYPE_CHECKING:
    from training.review import TriageThresholds


def _finding(name: str, class_names: Sequence[str], model: str) -> str:
    for known in class_names:
        if known.lower() == name.lower():
            return known
    raise ConfigError(f"--finding {name!r}: model {model!r} has classes {list(class_names)}")


def _default_finding(contract: ModelContract) -> str:
    spec = contract.spec
    if spec.task.startswith("binary"):
        return spec.finding
    raise ConfigError(
        f"--finding: model {contract.model!r} is {spec.task} with classes "
        f"{list(spec.class_names)}; name the finding (only binary models have a default)"
    )


def cmd_triage(args: argparse.Namespace) -> int:
    from training.review import triage_thresholds

    ppv, npv = args.target_ppv, args.target_npv
    delta = delta_of(args, ["target_ppv", "target_npv"])
    probability(ppv, "--target-ppv", open_interval=True)
    probability(npv, "--target-npv", open_interval=True)
    finding = args.finding
    plan: TriageThresholds | None = None
    flag = " ".join(f"--target-{k} {v:g}" for k, v in (("ppv", ppv), ("npv", npv)) if v is not None)

    def check(contract: ModelContract) -> None:
        nonlocal finding, plan
        spec = contract.spec
        if args.finding:
            finding = _finding(args.finding, spec.class_names, contract.model)
        else:
            finding = _default_finding(contract)
        if flag:
            stats = model_review_statistics(contract, flag, "drop the targets for a plain ranking")
            try:
                plan = triage_thresholds(
                    stats, finding, target_ppv=ppv, target_npv=npv, delta=delta
                )
            except ConfigError as exc:
                raise unreachable(flag, contract.model, exc) from exc

    if args.out:
        check_writable(Path(args.out).parent, f"--out {args.out}")
    if args.explain:
        check_explain_dir(args.explain)
    run = run_client(args, "triage", needing_maps(args, check))
    ranked = sorted(run.ok, key=lambda p: (-p.probabilities[finding], p.file))
    if args.top:
        ranked = ranked[: args.top]
    id_fields = DICOM_IDS.split()
    by_file = {i.name: i for i in run.items}
    rows = []
    buckets: Counter[str] = Counter()
    for rank, p in enumerate(ranked, 1):
        ids = dicom_ids_of(by_file.get(p.file))
        prob = p.probabilities[finding]
        bucket = [] if plan is None else [plan.bucket(prob)]
        buckets.update(bucket)
        rows.append(
            [rank, p.file, f"{prob:.6f}", p.label, *bucket, *(ids.get(f, "") for f in id_fields)]
        )
    header = ["rank", "file", f"prob_{finding}", "label", *(["bucket"] if plan else [])]
    text = csv_text([*header, *id_fields], rows)
    summary = _triage_summary(plan, buckets) if plan else []
    if args.out:
        out = Path(args.out)
        info: dict = {"model": run.contract.model, "finding": finding, "studies": len(rows)}
        info["operating_threshold"] = run.contract.threshold  # decides the label column
        info.update(_triage_info(plan, buckets) if plan else {"buckets": None})
        how = sidecar(out, info, mode=0o600)
        write_atomic(out, text.encode(), mode=0o600)  # may hold patient identifiers
        # identifiers go to the worklist only, never to the terminal or a log
        print(f"{len(rows)} stud(ies) ordered by P({finding}) into {out} (how: {how})")
        for line in summary:
            print(line)
    else:
        sys.stdout.write(text)
        for line in summary:
            print(line, file=sys.stderr)
    errors = list(run.errors)
    if args.explain:
        errors += explain_files(args, run, [str(r[1]) for r in rows], class_name=finding)
    return finish(errors, run.total)


def _triage_info(plan: TriageThresholds, buckets: Counter[str]) -> dict:
    what = [f"the {k} of the {b} bucket is >= {t:g}" for k, b, t in _targets(plan)]
    return {
        "method": "learn-then-test",
        "target_ppv": plan.target_ppv,
        "target_npv": plan.target_npv,
        "delta": plan.delta,
        "guarantee": guarantee(" and ".join(what), plan.delta, plan.split),
        "urgent_at": plan.urgent_at,
        "routine_below": plan.routine_below,
        "calibration": {"split": plan.split, "n": plan.n},
        "expected_urgent": plan.expected_urgent,
        "expected_routine": plan.expected_routine,
        "buckets": {b: buckets.get(b, 0) for b in ("urgent", "routine", "uncertain")},
    }


def _targets(plan: TriageThresholds) -> list[tuple[str, str, float]]:
    both = [("PPV", "urgent", plan.target_ppv), ("NPV", "routine", plan.target_npv)]
    return [(k, b, t) for k, b, t in both if t is not None]


def _triage_summary(plan: TriageThresholds, buckets: Counter[str]) -> list[str]:
    lines = []
    if plan.urgent_at is not None:
        expected = f"expected {plan.expected_urgent:.1%}"
        cut = f"P >= {plan.urgent_at:.6g}, PPV >= {plan.target_ppv:g}"
        lines.append(f"  urgent ({cut}): {buckets['urgent']} ({expected})")
    if plan.target_npv is not None:
        expected = f"expected {plan.expected_routine:.1%}"
        cut = f"P < {plan.routine_below:.6g}, NPV >= {plan.target_npv:g}"
        lines.append(f"  routine ({cut}): {buckets['routine']} ({expected})")
    lines.append(f"  uncertain: {buckets['uncertain']}")
    lines.append(f"  guarantee: {_triage_info(plan, buckets)['guarantee']}")
    return lines


def register(sub) -> None:
    p = sub.add_parser("triage", help="order studies by the predicted probability of a finding")
    add_client_options(p)
    p.add_argument(
        "--finding",
        default="",
        help="a class of the model, e.g. pneumonia (default: a binary model's finding)",
    )
    p.add_argument("--out", default="", help="worklist CSV (default: print it)")
    p.add_argument("--top", type=int, default=0, help="keep the K most likely (0: all)")
    p.add_argument(
        "--explain", default="", help="write the CAM overlay of every study listed into DIR"
    )
    p.add_argument(
        "--target-ppv",
        type=float,
        default=None,
        help="an urgent bucket whose PPV is guaranteed >= P (Learn then Test)",
    )
    p.add_argument(
        "--target-npv",
        type=float,
        default=None,
        help="a routine bucket whose NPV is guaranteed >= P (Learn then Test)",
    )
    add_delta(p)
    p.set_defaults(func=cmd_triage)
