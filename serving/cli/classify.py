"""``medimg classify``, ``medimg label`` and ``medimg triage``: images in, through a
running Triton server, predictions out.

    medimg classify ../shared/data/samples --protocol grpc --csv
    medimg label ../shared/data/pneumoniamnist.npz --split test --out labels.csv --review-below 0.9
    medimg label ../shared/data/pneumoniamnist.npz --out labels.csv --target-accuracy 0.95
    medimg triage ../shared/data/samples --finding pneumonia --out worklist.csv
    medimg triage ../shared/data/samples --target-ppv 0.9 --target-npv 0.98 --out worklist.csv

With a target, the thresholds come from the review statistics in the model's spec
(training.review) and are chosen before any image is sent.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from serving.cli.options import add_client_options
from serving.clients.commands import csv_text, dicom_ids_of, finish, prob_columns, run_client
from serving.clients.contract import ModelContract
from serving.explain.flagged import check_explain_dir, explain_files
from serving.repository.layout import check_writable, write_atomic
from training.errors import ConfigError
from training.images import DICOM_IDS

if TYPE_CHECKING:
    from training.review import TriageThresholds


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


def _probability(value: float | None, flag: str, *, open_interval: bool = False) -> None:
    if value is None:
        return
    ok = 0.0 < value < 1.0 if open_interval else 0.0 <= value <= 1.0
    if not ok:
        span = "strictly between 0 and 1" if open_interval else "a probability in [0, 1]"
        raise ConfigError(f"{flag}: expected {span}, got {value}")


def _delta(args: argparse.Namespace, targets: Sequence[str]) -> float:
    """``--delta`` (default 0.05), allowed only with one of ``targets``."""
    if args.delta is not None and all(getattr(args, t) is None for t in targets):
        flags = " or ".join(f"--{t.replace('_', '-')}" for t in targets)
        raise ConfigError(f"--delta: goes with {flags} (the chance the guarantee fails)")
    delta = 0.05 if args.delta is None else args.delta
    _probability(delta, "--delta", open_interval=True)
    return delta


def _review_statistics(contract: ModelContract, flag: str, instead: str) -> dict:
    """The model's review statistics, or a ConfigError saying why there are none."""
    spec, model = contract.spec, contract.model
    if spec.multi_label:
        raise ConfigError(
            f"{flag}: model {model!r} is {spec.task}; the guarantee is for single-label "
            f"tasks only, for now ({instead})"
        )
    if not spec.review:
        raise ConfigError(
            f"{flag}: model {model!r} has no review statistics (its version was trained "
            "before medimg kept them): retrain it and export the new version to get "
            f"guaranteed thresholds ({instead}); nothing was sent or written"
        )
    return spec.review


def _unreachable(flag: str, model: str, exc: Exception) -> ConfigError:
    return ConfigError(f"{flag}: model {model!r}: {exc}; nothing was sent or written")


def _sidecar(out: Path, info: dict, mode: int = 0o644) -> Path:
    """``<out>.json``: how ``out`` was made (the thresholds, the guarantee and its terms)."""
    path = out.with_name(out.name + ".json")
    write_atomic(path, (json.dumps(info, indent=2) + "\n").encode(), mode=mode)
    return path


def _guarantee(what: str, delta: float, split: str) -> str:
    return (
        f"with probability >= {1 - delta:g}, {what}, if the images are exchangeable with "
        f"the model's {split} split (a statement about the expected rate, not every batch)"
    )


def cmd_label(args: argparse.Namespace) -> int:
    from training.review import LabelThresholds, label_thresholds

    target = args.target_accuracy
    delta = _delta(args, ["target_accuracy"])
    review_below = 0.9 if args.review_below is None else args.review_below
    _probability(review_below, "--review-below")
    _probability(target, "--target-accuracy", open_interval=True)
    check_writable(Path(args.out).parent, f"--out {args.out}")
    if args.explain:
        check_explain_dir(args.explain)
    plan: LabelThresholds | None = None

    def check(contract: ModelContract) -> None:
        nonlocal plan
        flag = f"--target-accuracy {target:g}"
        stats = _review_statistics(contract, flag, "use --review-below P for a cut of your own")
        try:
            plan = label_thresholds(stats, target, delta)
        except ConfigError as exc:
            raise _unreachable(flag, contract.model, exc) from exc

    run = run_client(args, "label", None if target is None else check)
    names = run.contract.spec.class_names
    rows = []
    for p in run.ok:
        if plan is None:
            flagged, cut = p.probability < review_below, review_below
        else:
            flagged, cut = plan.needs_review(p.label, p.probability), plan.thresholds[p.label]
        extra = [] if plan is None else ["" if cut is None else f"{cut:.9g}"]
        probs = [f"{p.probabilities[n]:.6f}" for n in names]
        rows.append([p.file, p.label, f"{p.probability:.6f}", str(flagged).lower(), *extra, *probs])
    header = ["file", "label", "probability", "needs_review"]
    header += [] if plan is None else ["review_threshold"]
    out = Path(args.out)
    review = sum(1 for r in rows if r[3] == "true")
    info: dict = {"model": run.contract.model, "images": len(rows), "needs_review": review}
    if plan is None:
        info.update(review_below=review_below, guarantee=None)
    else:
        info.update(
            method="learn-then-test",
            target_accuracy=target,
            delta=delta,
            delta_per_class=plan.delta_per_class,
            guarantee=_guarantee(
                f"the accuracy of the auto-labelled images is >= {target:g}", delta, plan.split
            ),
            thresholds=plan.thresholds,
            calibration={"split": plan.split, "n": plan.n},
            expected_auto_fraction=plan.expected_auto_fraction,
            expected_auto_per_class=plan.expected_auto_per_class,
            auto_labelled=len(rows) - review,
        )
    sidecar = _sidecar(out, info)
    write_atomic(out, csv_text(header + prob_columns(names), rows).encode())
    counts = Counter(p.label for p in run.ok)
    print(f"labelled {len(rows)} image(s) into {out} (how: {sidecar})")
    for name in names:
        print(f"  {name:<24} {counts.get(name, 0):>7}")
    if plan is None:
        print(f"  needs review (p < {review_below:.2f}): {review}")
    else:
        done = len(rows) - review
        share = f"{done / len(rows):.1%}" if rows else "-"
        print(
            f"  auto-labelled: {done} ({share}; expected {plan.expected_auto_fraction:.1%} "
            f"from the {plan.n} {plan.split} cases)"
        )
        print(f"  needs review: {review}")
        for name, cut in plan.thresholds.items():
            if cut is None:
                best = plan.best_per_class[name]
                most = f"the most guaranteed for it is {best:.4f}" if best else "nothing is"
                print(f"  predicted {name}: always reviewed ({most})")
        print(f"  guarantee: {info['guarantee']}")
    errors = list(run.errors)
    if args.explain:
        errors += explain_files(args, run, [r[0] for r in rows if r[3] == "true"])
    return finish(errors, run.total)


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
    delta = _delta(args, ["target_ppv", "target_npv"])
    _probability(ppv, "--target-ppv", open_interval=True)
    _probability(npv, "--target-npv", open_interval=True)
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
            stats = _review_statistics(contract, flag, "drop the targets for a plain ranking")
            try:
                plan = triage_thresholds(
                    stats, finding, target_ppv=ppv, target_npv=npv, delta=delta
                )
            except ConfigError as exc:
                raise _unreachable(flag, contract.model, exc) from exc

    if args.out:
        check_writable(Path(args.out).parent, f"--out {args.out}")
    if args.explain:
        check_explain_dir(args.explain)
    run = run_client(args, "triage", check)
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
        info.update(_triage_info(plan, buckets) if plan else {"buckets": None})
        sidecar = _sidecar(out, info, mode=0o600)
        write_atomic(out, text.encode(), mode=0o600)  # may hold patient identifiers
        # identifiers go to the worklist only, never to the terminal or a log
        print(f"{len(rows)} stud(ies) ordered by P({finding}) into {out} (how: {sidecar})")
        for line in summary:
            print(line)
    else:
        sys.stdout.write(text)
        for line in summary:
            print(line, file=sys.stderr)
    errors = list(run.errors)
    if args.explain:
        errors += explain_files(args, run, [str(r[1]) for r in rows])
    return finish(errors, run.total)


def _triage_info(plan: TriageThresholds, buckets: Counter[str]) -> dict:
    what = [f"the {k} of the {b} bucket is >= {t:g}" for k, b, t in _targets(plan)]
    return {
        "method": "learn-then-test",
        "target_ppv": plan.target_ppv,
        "target_npv": plan.target_npv,
        "delta": plan.delta,
        "guarantee": _guarantee(" and ".join(what), plan.delta, plan.split),
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
        "--explain", default="", help="write the CAM overlay of every flagged image into DIR"
    )
    cut = p.add_mutually_exclusive_group()
    cut.add_argument(
        "--review-below",
        type=float,
        default=None,
        help="flag predictions whose probability is below P (default 0.9)",
    )
    cut.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="auto-label only where the accuracy is guaranteed >= A (per-class thresholds "
        "from the model's validation split, Learn then Test); flag the rest",
    )
    _add_delta(p)
    p.set_defaults(func=cmd_label)

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
    _add_delta(p)
    p.set_defaults(func=cmd_triage)


def _add_delta(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--delta",
        type=float,
        default=None,
        help="with a target: the chance that the guarantee fails (default 0.05)",
    )
