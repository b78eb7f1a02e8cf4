"""Would horizontal-flip test-time augmentation (TTA) help? For every version of every
model registered in an MLflow store (e.g. the one a ``precision_seeds.py`` run wrote),
the val and test AUC / ACC of the model as served (its calibrated probabilities) and of
the mean of its probabilities for the image and its mirror image. The decision is read
on val; test is printed beside it for the record, not to choose by::

    python benchmarks/tta_flip.py --data-dir ../shared/data \
        --tracking-uri sqlite:///bench-results/precision-seeds-20261204-110139/mlflow.db
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from training.config import TrainConfig
from training.data import DataOptions, open_split
from training.metrics import evaluate
from training.registry import load_model


@torch.no_grad()
def probabilities(module: torch.nn.Module, x: np.ndarray, flip: bool) -> np.ndarray:
    """The module's probabilities for ``x``; with ``flip``, averaged with the mirror's."""
    batch = torch.as_tensor(x)
    probs = module(batch)
    if flip:
        probs = (probs + module(torch.flip(batch, dims=[-1]))) / 2
    return probs.float().numpy()


def score(loaded, data_dir: str) -> dict[str, float]:
    """Val and test AUC / ACC without and with the flip, for one loaded model."""
    spec = loaded.spec
    cfg = TrainConfig(dataset=spec.dataset, data_dir=data_dir, size=spec.source_size or 28)
    out = {}
    for split in ("val", "test"):
        data = open_split(
            DataOptions.from_config(cfg),
            split,
            image_size=spec.image_size,
            channels=spec.channels,
        )
        x = data.model_input(spec.mean, spec.std)
        for flip in (False, True):
            scores = evaluate(spec.task, data.labels, probabilities(loaded.module, x, flip))
            tag = "tta" if flip else "plain"
            out[f"{split}_auc_{tag}"], out[f"{split}_acc_{tag}"] = scores["auc"], scores["acc"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--data-dir", default="")
    args = p.parse_args()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    rows = []
    print(
        "| model | val AUC | val AUC flip | test AUC | test AUC flip | test ACC | test ACC flip |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for version in sorted(client.search_model_versions(), key=lambda v: (v.name, int(v.version))):
        name = f"{version.name}/{version.version}"
        r = score(load_model(args.tracking_uri, f"models:/{name}"), args.data_dir)
        rows.append(r)
        print(
            f"| {name} | {r['val_auc_plain']:.4f} | {r['val_auc_tta']:.4f} | "
            f"{r['test_auc_plain']:.4f} | {r['test_auc_tta']:.4f} | "
            f"{r['test_acc_plain']:.4f} | {r['test_acc_tta']:.4f} |",
            flush=True,
        )
    for split in ("val", "test"):
        gains = [r[f"{split}_auc_tta"] - r[f"{split}_auc_plain"] for r in rows]
        print(
            f"{split}: flip - plain AUC mean {statistics.mean(gains):+.4f}, "
            f"higher in {sum(g > 0 for g in gains)}/{len(gains)} models"
        )


if __name__ == "__main__":
    main()
