"""MixUp and CutMix of a training batch (``--mixup-alpha`` / ``--cutmix-alpha``).

Each batch is paired with a shuffled copy of itself and a mixing weight ``lam`` is drawn
from Beta(alpha, alpha):

- MixUp (Zhang et al., 2018) blends whole images: ``lam * x + (1 - lam) * x[perm]``;
- CutMix (Yun et al., 2019) pastes a box of area ``1 - lam`` from ``x[perm]``, then sets
  ``lam`` to the share of pixels the image kept.

With both alphas set, each batch takes one of the two at random (as timm's ``Mixup``
does). The loss is ``lam * loss(y) + (1 - lam) * loss(y[perm])``, which for
binary cross-entropy equals the loss on the mixed targets. Validation, test and served
images are never mixed::

    python -c "import torch; from training.mix import BatchMixer; \
m = BatchMixer(0.2, 1.0, seed=0); \
x, y2, lam = m(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])); print(y2, round(lam, 3))"
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class BatchMixer:
    """Mixes one batch; ``alpha == 0`` turns that method off."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, seed: int = 0) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(
                f"mixup_alpha / cutmix_alpha: expected >= 0, got {mixup_alpha!r} / {cutmix_alpha!r}"
            )
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.rng = np.random.default_rng(seed)  # lam, method and box: a seeded run repeats
        self.generator = torch.Generator().manual_seed(seed)  # the pairing

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mixed images, the partner images' targets, weight of the original targets)."""
        if not self.active or len(x) < 2:
            return x, y, 1.0
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or self.rng.random() < 0.5)
        perm = torch.randperm(len(x), generator=self.generator).to(x.device)
        if not use_cutmix:
            lam = float(self.rng.beta(self.mixup_alpha, self.mixup_alpha))
            return x * lam + x[perm] * (1 - lam), y[perm], lam
        lam = float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        h, w = x.shape[-2:]
        cut_h, cut_w = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
        cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, h)
        left, right = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, w)
        if bottom <= top or right <= left:
            return x, y, 1.0
        mixed = x.clone()
        mixed[..., top:bottom, left:right] = x[perm, ..., top:bottom, left:right]  # the box only
        return mixed, y[perm], 1 - (bottom - top) * (right - left) / (h * w)


def mixed_loss(
    loss_fn: nn.Module, logits: torch.Tensor, y: torch.Tensor, y_other: torch.Tensor, lam: float
) -> torch.Tensor:
    """``lam * loss(y) + (1 - lam) * loss(y_other)``; plain ``loss(y)`` when unmixed."""
    if lam >= 1.0:
        return loss_fn(logits, y)
    return lam * loss_fn(logits, y) + (1 - lam) * loss_fn(logits, y_other)
