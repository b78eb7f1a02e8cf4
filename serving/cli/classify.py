"""``medimg classify`` and ``medimg label``: images in, through a running Triton server,
predictions (and review flags) out; ``medimg triage`` is ``serving.cli.triage``.

    medimg classify ../shared/data/samples --protocol grpc --csv
    medimg label ../shared/data/pneumoniamnist.npz --split test --out labels.csv --review-below 0.9
    medimg label ../shared/data/pneumoniamnist.npz --out labels.csv --target-accuracy 0.95

With a target, the thresholds come from the review statistics in the model's spec
(training.review) and are chosen before any image is sent.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

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
from serving.clients.commands import csv_text, finish, prob_columns, run_client
from serving.clients.contract import ModelContract
from serving.explain.flagged import check_explain_dir, explain_files, needing_maps
from serving.repository.layout import check_writable, write_atomic
from training.errors import ConfigError


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
    from training.review import LabelThresholds, label_thresholds

    target = args.target_accuracy
    delta = delta_of(args, ["target_accuracy"])
    review_below = 0.9 if args.review_below is None else args.review_below
    probability(review_below, "--review-below")
    probability(target, "--target-accuracy", open_interval=True)
    check_writable(Path(args.out).parent, f"--out {args.out}")
    if args.explain:
        check_explain_dir(args.explain)
    plan: LabelThresholds | None = None

    def check(contract: ModelContract) -> None:
        nonlocal plan
        flag = f"--target-accuracy {target:g}"
        stats = model_review_statistics(
            contract, flag, "use --review-below P for a cut of your own"
        )
        try:
            plan = label_thresholds(stats, target, delta)
        except ConfigError as exc:
            raise unreachable(flag, contract.model, exc) from exc

    run = run_client(args, "label", needing_maps(args, None if target is None else check))
    names = run.contract.spec.class_names
    rows = []
    for p in run.ok:
        if plan is None:
            flagged, cut = p.probability < review_below, review_below
        else:  # the guarantee is for the arg-max class: a label the operating threshold
            # decided otherwise is reviewed (binary, P(finding) between the two cut-offs)
            top = p.argmax_label
            cut = plan.thresholds[top]
            flagged = p.label != top or plan.needs_review(top, p.probabilities[top])
        extra = [] if plan is None else ["" if cut is None else f"{cut:.9g}"]
        probs = [f"{p.probabilities[n]:.6f}" for n in names]
        rows.append([p.file, p.label, f"{p.probability:.6f}", str(flagged).lower(), *extra, *probs])
    header = ["file", "label", "probability", "needs_review"]
    header += [] if plan is None else ["review_threshold"]
    out = Path(args.out)
    review = sum(1 for r in rows if r[3] == "true")
    info: dict = {"model": run.contract.model, "images": len(rows), "needs_review": review}
    info["operating_threshold"] = run.contract.threshold  # None: labels are the arg-max
    if plan is None:
        info.update(review_below=review_below, guarantee=None)
    else:
        info.update(
            method="learn-then-test",
            target_accuracy=target,
            delta=delta,
            delta_per_class=plan.delta_per_class,
            guarantee=guarantee(
                f"the accuracy of the auto-labelled images is >= {target:g}", delta, plan.split
            ),
            thresholds=plan.thresholds,
            calibration={"split": plan.split, "n": plan.n},
            expected_auto_fraction=plan.expected_auto_fraction,
            expected_auto_per_class=plan.expected_auto_per_class,
            auto_labelled=len(rows) - review,
        )
    how = sidecar(out, info)
    write_atomic(out, csv_text(header + prob_columns(names), rows).encode())
    counts = Counter(p.label for p in run.ok)
    print(f"labelled {len(rows)} image(s) into {out} (how: {how})")
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
    add_delta(p)
    p.set_defaults(func=cmd_label)
