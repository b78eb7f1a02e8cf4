"""The clinical-trust numbers of registered versions, in one table each: calibration on
the test split before -> after temperature scaling (as training logged it), and the
auto-labelling guarantee (Learn then Test, thresholds from the validation split's
statistics stored in the spec) against what it does on the test split.

The test split is only reported on here, never used to choose anything::

    python benchmarks/trust_table.py --tracking-uri sqlite:////tmp/trust/mlflow.db \
        --model breastmnist-densenet121 --model pneumoniamnist-densenet121 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from training.data import DataOptions, open_split
from training.errors import ConfigError
from training.registry import load_model, resolve_model_uri
from training.review import label_thresholds

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = (0.95, 0.99)
METRICS = (
    ("ece", "ECE (15 bins)"),
    ("ece_mass", "ECE (equal mass)"),
    ("brier", "Brier"),
    ("nll", "NLL"),
)


def _fmt(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "n/a"
    ci = f" ({e['ci_low']:.4f}–{e['ci_high']:.4f})" if e.get("ci_low") is not None else ""
    return f"{e['value']:.4f}{ci}"


def calibration_rows(tracking_uri: str, uri: str) -> tuple[list[str], dict]:
    import mlflow
    from mlflow import MlflowClient

    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    run_id = MlflowClient(tracking_uri=tracking_uri).get_model_version(name, version).run_id
    mlflow.set_tracking_uri(tracking_uri)
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/calibration/calibration.json"))
    temps = ", ".join(f"{t:.3f}" for t in report["temperature"])
    rows = [
        f"| {label} | {_fmt(report['before'].get(k))} | {_fmt(report['after'].get(k))} |"
        for k, label in METRICS
    ]
    return [
        f"temperature {temps}; test n = {report['n']}",
        "",
        "| metric | before (95% CI) | after (95% CI) |",
        "| --- | --- | --- |",
        *rows,
    ], report


def guarantee_rows(tracking_uri: str, uri: str, data_dir: str, delta: float) -> list[str]:
    loaded = load_model(tracking_uri, uri)
    spec = loaded.spec
    test = open_split(
        DataOptions(spec.dataset, data_dir),
        "test",
        image_size=spec.image_size,
        channels=spec.channels,
    )
    with torch.no_grad():
        probs = loaded.module(torch.from_numpy(test.model_input(spec.mean, spec.std))).numpy()
    y = test.labels.reshape(-1)
    pred = probs.argmax(1)
    head = ["target", "δ", "thresholds (per predicted class)", "auto-labelled: val (expected)"]
    head += ["auto-labelled: test", "accuracy of auto-labelled, test"]
    rows = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for target in TARGETS:
        try:
            t = label_thresholds(spec.review, target, delta)
        except ConfigError as exc:
            rows.append(f"| {target} | {delta} | unreachable: {str(exc).splitlines()[0]} | | | |")
            continue
        cut = np.array(
            [math.inf if t.thresholds[n] is None else t.thresholds[n] for n in spec.class_names]
        )
        auto = probs[np.arange(len(pred)), pred] >= cut[pred]
        acc = float((pred[auto] == y[auto]).mean()) if auto.any() else float("nan")
        shown = ", ".join(
            f"{n}: {'review all' if v is None else f'{v:.4f}'}" for n, v in t.thresholds.items()
        )
        ok = "" if not auto.any() or acc >= target else " (below target)"
        rows.append(
            f"| {target} | {delta} | {shown} | {t.expected_auto_fraction:.3f} | {auto.mean():.3f} "
            f"({int(auto.sum())}/{len(auto)}) | {acc:.4f}{ok} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument(
        "--model", action="append", required=True, help="NAME[/VERSION|@ALIAS], repeatable"
    )
    p.add_argument("--data-dir", required=True)
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--record", action="store_true", help=f"also write {RESULTS / 'trust.md'}")
    args = p.parse_args(argv)
    out = [
        f"# Calibration and the auto-labelling guarantee ({datetime.date.today()})",
        "",
        f"`python benchmarks/trust_table.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    for ref in args.model:
        uri, what = resolve_model_uri(args.tracking_uri, model=ref)
        lines, _ = calibration_rows(args.tracking_uri, uri)
        out += [
            f"## {what}",
            "",
            "### Calibration, test split",
            "",
            *lines,
            "",
            "### Auto-labelling guarantee (thresholds from val), realised on test",
            "",
            *guarantee_rows(args.tracking_uri, uri, args.data_dir, args.delta),
            "",
        ]
    text = "\n".join(out) + "\n"
    print(text)
    if args.record:
        (RESULTS / "trust.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
