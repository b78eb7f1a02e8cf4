"""Does the automatic training precision cost model quality? The same training run (the
default ``medimg pipeline`` config unless told otherwise) in fp32 and in ``--precision
auto`` (bf16 autocast + channels-last where the CPU has native bf16), for several seeds,
alternating (seed 0 fp32, seed 0 auto, seed 1 fp32, ...), each model chosen on val and
its test split touched once, as ``medimg train`` does. Prints each run, then per
precision the mean and sample standard deviation of test AUC / ACC and the training
images/s, and the AUC difference next to the seed-to-seed spread::

    python benchmarks/precision_seeds.py --data-dir ../shared/data --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from serving.perf.comparison.output import destinations, run_folder, write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = {"fp32": ("fp32", "contiguous"), "auto": ("auto", "auto")}


def train_once(args: argparse.Namespace, seed: int, variant: str) -> dict[str, float]:
    import ray
    from mlflow import MlflowClient

    from training.config import TrainConfig
    from training.driver import train_and_register

    precision, memory_format = VARIANTS[variant]
    cfg = TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=args.epochs,
        seed=seed,
        precision=precision,
        memory_format=memory_format,
        tracking_uri=args.tracking_uri,
        experiment="precision-seeds",
        storage_path=args.storage_path,
        model_name=f"{args.dataset}-precision-{variant}",
    )
    started = time.perf_counter()
    outcome = train_and_register(cfg)
    seconds = time.perf_counter() - started
    ray.shutdown()
    rates = MlflowClient(cfg.tracking_uri).get_metric_history(outcome.run_id, "train_images_per_s")
    return {
        "test_auc": outcome.test["auc"],
        "test_acc": outcome.test["acc"],
        "val_auc": outcome.val["auc"],
        "images_per_s": statistics.median(m.value for m in rates),
        "seconds": seconds,
    }


def _mean_sd(values: list[float], fmt: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="pneumoniamnist")
    p.add_argument("--data-dir", default="")
    p.add_argument("--epochs", type=int, default=3, help="the pipeline's default: 3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="", help="results folder (default bench-results/...)")
    p.add_argument("--record", action="store_true", help="also write into benchmarks/results/")
    args = p.parse_args()
    folders = destinations(
        args.out or run_folder("precision-seeds"), RESULTS_DIR if args.record else None
    )
    out = folders[0]
    args.tracking_uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    args.storage_path = str((out / "ray_results").resolve())
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    lines = [
        "| seed | precision | test AUC | test ACC | val AUC | train img/s | run s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    for seed in seeds:
        for variant in VARIANTS:
            r = train_once(args, seed, variant)
            runs[variant].append(r)
            lines.append(
                f"| {seed} | {variant} | {r['test_auc']:.4f} | {r['test_acc']:.4f} | "
                f"{r['val_auc']:.4f} | {r['images_per_s']:.1f} | {r['seconds']:.0f} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "| precision | test AUC | test ACC | train img/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for variant, rs in runs.items():
        lines.append(
            f"| {variant} | {_mean_sd([r['test_auc'] for r in rs], '.4f')} | "
            f"{_mean_sd([r['test_acc'] for r in rs], '.4f')} | "
            f"{_mean_sd([r['images_per_s'] for r in rs], '.1f')} |"
        )
    diff = statistics.mean(r["test_auc"] for r in runs["auto"]) - statistics.mean(
        r["test_auc"] for r in runs["fp32"]
    )
    spread = max(statistics.stdev(r["test_auc"] for r in rs) for rs in runs.values())
    lines.append(f"\nauto - fp32 mean test AUC: {diff:+.4f}; largest seed-to-seed SD: {spread:.4f}")
    print("\n".join(lines[-(len(VARIANTS) + 3) :]), flush=True)
    for path in write_text(folders, "precision_seeds.md", "\n".join(lines) + "\n"):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
