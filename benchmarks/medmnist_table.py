"""Test AUC / ACC of our DenseNet-121 runs beside the published MedMNIST v2 Table 3 rows.

Trains each data set given (or tunes it first with ``--tune-samples N``) through the
same code as ``medimg train`` / ``medimg tune``: model chosen on val, test split
touched once. Writes a markdown table, ``medmnist_table.md``, into ``--out`` (default
``bench-results/medmnist-table-TIME``; with ``--record`` also into ``benchmarks/results/``)
and prints the wall time::

    python benchmarks/medmnist_table.py --data-dir ../shared/data \
        --datasets pneumoniamnist,breastmnist --epochs 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from serving.perf.comparison.output import destinations, run_folder, write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# MedMNIST v2 (Yang et al., Scientific Data 2023), Table 3: test AUC / ACC.
PUBLISHED: dict[str, dict[str, tuple[float, float]]] = {
    "pneumoniamnist": {
        "ResNet-18 (28)": (0.944, 0.854),
        "ResNet-18 (224)": (0.956, 0.864),
        "ResNet-50 (28)": (0.948, 0.854),
        "ResNet-50 (224)": (0.962, 0.884),
        "auto-sklearn": (0.942, 0.855),
        "AutoKeras": (0.947, 0.878),
        "Google AutoML Vision": (0.991, 0.946),
    },
    "breastmnist": {
        "ResNet-18 (28)": (0.901, 0.863),
        "ResNet-18 (224)": (0.891, 0.833),
        "ResNet-50 (28)": (0.857, 0.812),
        "ResNet-50 (224)": (0.866, 0.842),
        "auto-sklearn": (0.836, 0.803),
        "AutoKeras": (0.871, 0.831),
        "Google AutoML Vision": (0.919, 0.861),
    },
}


def epochs_for(dataset: str, spec: str) -> int:
    """``--epochs 10`` for every data set, or ``pneumoniamnist=8,breastmnist=40``."""
    if "=" not in spec:
        return int(spec)
    table = dict(item.split("=", 1) for item in spec.split(","))
    if dataset not in table:
        raise SystemExit(f"--epochs: no value for {dataset} in {spec!r}")
    return int(table[dataset])


def run_one(dataset: str, args: argparse.Namespace) -> dict[str, float]:
    import ray

    from serving.pipeline import accuracy_at_threshold
    from training.driver import train_and_register
    from training.recipes import build_config

    cfg = build_config(
        args.recipe,
        dataset=dataset,
        data_dir=args.data_dir,
        size=args.size,
        image_size=args.image_size,
        epochs=epochs_for(dataset, args.epochs),
        batch_size=args.batch_size,
        lr=args.lr,
        augment=args.augment,
        class_weighting=args.class_weighting,
        scheduler=args.scheduler,
        ema_decay=args.ema_decay,
        mixup_alpha=args.mixup_alpha,
        cutmix_alpha=args.cutmix_alpha,
        tracking_uri=args.tracking_uri,
        experiment="medmnist-table",
        storage_path=args.storage_path,
        seed=args.seed,
    )
    started = time.perf_counter()
    if args.tune_samples:
        from training.tune import TuneSettings, run_tune

        settings = TuneSettings(
            samples=args.tune_samples, time_budget_s=args.tune_budget_s, space_file=args.space
        )
        outcome = run_tune(cfg, settings).registered
    else:
        outcome = train_and_register(cfg)
    ray.shutdown()
    at_threshold = accuracy_at_threshold(outcome.spec, outcome.test_labels, outcome.test_probs)
    return {
        "acc_at_threshold": float("nan") if at_threshold is None else at_threshold,
        "auc": outcome.test["auc"],
        "acc": outcome.test["acc"],
        "val_auc": outcome.val["auc"],
        "seconds": time.perf_counter() - started,
    }


def table(results: dict[str, dict[str, float]], label: str) -> str:
    datasets = list(results)
    lines = [
        "| method | " + " | ".join(f"{d} AUC / ACC" for d in datasets) + " |",
        "| --- | " + " | ".join("---" for _ in datasets) + " |",
    ]
    rows = sorted(
        {m for d in datasets for m in PUBLISHED.get(d, {})},
        key=list(PUBLISHED["pneumoniamnist"]).index,
    )
    for method in rows:
        cells = []
        for d in datasets:
            auc, acc = PUBLISHED.get(d, {}).get(method, (float("nan"), float("nan")))
            cells.append(f"{auc:.3f} / {acc:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    ours = [f"**{results[d]['auc']:.3f} / {results[d]['acc']:.3f}**" for d in datasets]
    lines.append(f"| {label} | " + " | ".join(ours) + " |")
    beaten = []
    for d in datasets:
        rows_d = PUBLISHED.get(d, {})
        auc_wins = sum(results[d]["auc"] > v[0] for v in rows_d.values())
        acc_wins = sum(results[d]["acc"] > v[1] for v in rows_d.values())
        beaten.append(
            f"{d}: AUC above {auc_wins}/{len(rows_d)} rows, ACC above {acc_wins}/{len(rows_d)}"
        )
    return "\n".join(lines) + "\n\n" + "; ".join(beaten) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="")
    p.add_argument("--datasets", default="pneumoniamnist,breastmnist")
    p.add_argument("--recipe", default="", help="medmnist | chexnet (explicit options below win)")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--epochs", default="10", help="N, or per data set: pneumoniamnist=8,breastmnist=40"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--augment", default="hflip,affine")
    p.add_argument("--class-weighting", default="balanced")
    p.add_argument("--scheduler", default="cosine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=0.0, help="0: off (see medimg train)")
    p.add_argument("--mixup-alpha", type=float, default=0.0, help="0: off (see medimg train)")
    p.add_argument("--cutmix-alpha", type=float, default=0.0, help="0: off (see medimg train)")
    p.add_argument("--tune-samples", type=int, default=0, help="tune N trials first (medimg tune)")
    p.add_argument("--tune-budget-s", type=float, default=0.0, help="stop tuning after S s")
    p.add_argument("--space", default="", help="search space YAML (default: medimg tune's)")
    p.add_argument("--file", default="medmnist_table.md", help="name of the table file")
    p.add_argument("--tracking-uri", default="")
    p.add_argument("--storage-path", default="ray_results/medmnist_table")
    p.add_argument(
        "--out",
        default="",
        help="folder for medmnist_table.md (default: a new bench-results/medmnist-table-TIME "
        "under the current directory)",
    )
    p.add_argument(
        "--record", action="store_true", help="also write benchmarks/results/medmnist_table.md"
    )
    args = p.parse_args()
    folders = destinations(
        args.out or run_folder("medmnist-table"), RESULTS_DIR if args.record else None
    )

    started = time.perf_counter()
    results = {d: run_one(d, args) for d in args.datasets.split(",") if d}
    wall = time.perf_counter() - started
    label = (
        f"medimg DenseNet-121 ({'image size tuned' if args.tune_samples else f'{args.image_size} px'}"
        f" from {args.size} px files, epochs {args.epochs}"
        + (f", tuned {args.tune_samples} trials" if args.tune_samples else "")
        + (f", EMA {args.ema_decay:g}" if args.ema_decay else "")
        + (f", MixUp {args.mixup_alpha:g}" if args.mixup_alpha else "")
        + (f", CutMix {args.cutmix_alpha:g}" if args.cutmix_alpha else "")
        + ")"
    )
    text = table(results, label)
    detail = "\n".join(
        f"- {d}: val AUC {r['val_auc']:.3f}; test ACC at the operating threshold "
        f"{r['acc_at_threshold']:.3f}; {r['seconds']:.0f} s"
        for d, r in results.items()
    )
    command = "python benchmarks/medmnist_table.py " + " ".join(sys.argv[1:])
    text += (
        f"\n{detail}\n\nWall time {wall / 60:.1f} min on this machine.\n\n```bash\n{command}\n```\n"
    )
    paths = write_text(folders, args.file, text)
    print(text)
    print("written to " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
