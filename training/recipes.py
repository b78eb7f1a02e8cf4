"""Named training presets; options given explicitly always win over the recipe.

- ``medmnist``: the MedMNIST v2 protocol — Adam, lr 1e-3, MultiStepLR ×0.1 at 50% and
  75% of the epochs, batch 128, 100 epochs, no augmentation, (x - .5) / .5.
- ``chexnet``: CheXNet (Rajpurkar et al. 2017) — 224 px, Adam lr 1e-3 with
  β = (0.9, 0.999), batch 16, ReduceLROnPlateau ÷10 on val AUC, random horizontal flip,
  ImageNet normalisation, class-balanced (weighted) binary cross-entropy.

::

    python -c "from training.recipes import build_config; print(build_config('chexnet', epochs=1))"
"""

from __future__ import annotations

from typing import Any

from training.config import RECIPES, TrainConfig
from training.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    "medmnist": {
        "optimizer": "adam",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "scheduler": "multistep",
        "batch_size": 128,
        "epochs": 100,
        "augment": "",
        "normalization": "medmnist",
    },
    "chexnet": {
        "image_size": 224,
        "optimizer": "adam",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "scheduler": "plateau",
        "batch_size": 16,
        "augment": "hflip",
        "normalization": "imagenet",
        "class_weighting": "balanced",
    },
}
assert set(PRESETS) == set(RECIPES)


def build_config(recipe: str = "", **explicit: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a recipe's values overlaid with ``explicit`` ones."""
    if recipe and recipe not in PRESETS:
        raise ConfigError(f"recipe: expected one of {sorted(PRESETS)}, got {recipe!r}")
    values = {**PRESETS.get(recipe, {}), **explicit, "recipe": recipe}
    return TrainConfig.from_dict(values)
