"""Does the automatic training precision cost model quality? The same training run (the
default ``medimg pipeline`` config unless told otherwise) in fp32 and in ``--precision
auto`` (bf16 autocast + channels-last where the CPU has native bf16), for several seeds,
alternating (seed 0 fp32, seed 0 auto, seed 1 fp32, ...), each model chosen on val and
its test split touched once, as ``medimg train`` does. Prints each run, then per
variant the mean and sample standard deviation of test AUC / ACC and the training
images/s, and the AUC difference next to the seed-to-seed spread.

``--variants`` compares any other training options the same way (the first variant is
the baseline), on a base config changed by ``--set``::

    python benchmarks/precision_seeds.py --data-dir ../shared/data --seeds 0,1,2
    python benchmarks/precision_seeds.py --data-dir ../shared/data --dataset breastmnist \
        --set epochs=40,batch_size=64,augment=hflip+affine,class_weighting=balanced \
        --variants "off:ema_decay=0;ema:ema_decay=0.98" --file ema_seeds.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from serving.perf.comparison.output import destinations, run_folder, write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_VARIANTS = (
    "fp32:precision=fp32,memory_format=contiguous;auto:precision=auto,memory_format=auto"
)


def parse_options(text: str) -> dict[str, str]:
    """``k=v,k=v`` (a ``+`` inside a value stands for a comma: ``augment=hflip+affine``)."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"options: expected k=v,k=v, got {text!r}")
    return {k.strip(): v.strip().replace("+", ",") for k, v in pairs}


def typed(base: dict[str, Any], options: dict[str, str]) -> dict[str, Any]:
    """Option strings as the types of ``base``'s fields (a ``TrainConfig`` as a dict)."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name not in base:
            raise SystemExit(f"unknown training option {name!r}")
        kind = type(base[name])
        out[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def parse_variants(text: str) -> dict[str, dict[str, str]]:
    """``name:k=v,k=v;name:k=v`` as {name: options}."""
    variants = {}
    for part in text.split(";"):
        name, _, options = part.partition(":")
        variants[name.strip()] = parse_options(options)
    return variants


def train_once(
    args: argparse.Namespace, seed: int, variant: str, options: dict[str, str]
) -> dict[str, float]:
    import ray
    from mlflow import MlflowClient

    from training.config import TrainConfig
    from training.driver import train_and_register

    base = TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=args.epochs,
        seed=seed,
        tracking_uri=args.tracking_uri,
        experiment="precision-seeds",
        storage_path=args.storage_path,
        model_name=f"{args.dataset}-seeds-{variant}",
    ).to_dict()
    cfg = TrainConfig.from_dict({**base, **typed(base, {**args.base, **options})})
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
    p.add_argument("--set", default="", help="base options k=v,k=v (+ for a comma in a value)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="name:k=v,...;name:k=v,...")
    p.add_argument("--file", default="precision_seeds.md", help="name of the results file")
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
    args.base = parse_options(args.set)
    variants = parse_variants(args.variants)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    lines = [
        f"base options: {args.set or '(the pipeline default)'}; variants: {args.variants}",
        "",
        "| seed | variant | test AUC | test ACC | val AUC | train img/s | run s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    for seed in seeds:
        for variant, options in variants.items():
            r = train_once(args, seed, variant, options)
            runs[variant].append(r)
            lines.append(
                f"| {seed} | {variant} | {r['test_auc']:.4f} | {r['test_acc']:.4f} | "
                f"{r['val_auc']:.4f} | {r['images_per_s']:.1f} | {r['seconds']:.0f} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "| variant | test AUC | test ACC | train img/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for variant, rs in runs.items():
        lines.append(
            f"| {variant} | {_mean_sd([r['test_auc'] for r in rs], '.4f')} | "
            f"{_mean_sd([r['test_acc'] for r in rs], '.4f')} | "
            f"{_mean_sd([r['images_per_s'] for r in rs], '.1f')} |"
        )
    baseline, *others = variants
    spread = max(
        (statistics.stdev(r["test_auc"] for r in rs) for rs in runs.values() if len(rs) > 1),
        default=float("nan"),
    )
    lines.append("")
    for other in others:
        diff = statistics.mean(r["test_auc"] for r in runs[other]) - statistics.mean(
            r["test_auc"] for r in runs[baseline]
        )
        lines.append(f"{other} - {baseline} mean test AUC: {diff:+.4f}")
    lines.append(f"largest seed-to-seed SD: {spread:.4f}")
    print("\n".join(lines[-(len(variants) + len(others) + 4) :]), flush=True)
    for path in write_text(folders, args.file, "\n".join(lines) + "\n"):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
