"""Batched, per-image random augmentation on the training device, then normalisation.

Images arrive as uint8 (B, C, S, S) tensors; each named augmentation draws its
own random parameters per image, scaled by ``strength`` (0..1):

- ``hflip``: horizontal flip with probability 0.5;
- ``affine``: rotation ±15°·s, translation ±10%·s, scale 1 ± 0.1·s (border padding);
- ``contrast``: brightness ±0.2·s and contrast ×(1 ± 0.3·s).

Validation, test and served images see only the normalisation::

    python -c "import torch; from training.augment import BatchTransform; \
t = BatchTransform(('hflip', 'affine'), 0.5, (0.5,), (0.5,)); \
print(t(torch.zeros(4, 1, 64, 64, dtype=torch.uint8), train=True).shape)"
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from training.errors import ConfigError

KNOWN = ("hflip", "affine", "contrast")


class BatchTransform:
    """uint8 (B, C, S, S) -> float32 normalised, with the named augmentations when training."""

    def __init__(
        self,
        augmentations: Sequence[str],
        strength: float,
        mean: Sequence[float],
        std: Sequence[float],
        generator: torch.Generator | None = None,
    ) -> None:
        unknown = sorted(set(augmentations) - set(KNOWN))
        if unknown:
            raise ConfigError(f"augment: unknown {unknown}; known: {list(KNOWN)}")
        self.augmentations = tuple(augmentations)
        self.strength = float(strength)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.generator = generator

    def _rand(self, n: int, device: torch.device) -> torch.Tensor:
        """Uniform in [-1, 1), shape (n,)."""
        return (torch.rand(n, generator=self.generator) * 2 - 1).to(device)

    def __call__(self, x: torch.Tensor, *, train: bool) -> torch.Tensor:
        x = x.float().div_(255.0)
        if train and self.augmentations:
            x = self.augment(x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image random augmentation of float images in [0, 1]."""
        n, s = len(x), self.strength
        if "hflip" in self.augmentations:
            flip = (torch.rand(n, generator=self.generator) < 0.5).to(x.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if "affine" in self.augmentations and s > 0:
            angle = self._rand(n, x.device) * math.radians(15.0) * s
            scale = 1.0 + self._rand(n, x.device) * 0.1 * s
            tx, ty = (self._rand(n, x.device) * 0.2 * s for _ in range(2))  # grid units: 2 = width
            cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
            theta = torch.stack(
                [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
            )
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
        if "contrast" in self.augmentations and s > 0:
            brightness = self._rand(n, x.device).view(-1, 1, 1, 1) * 0.2 * s
            contrast = 1.0 + self._rand(n, x.device).view(-1, 1, 1, 1) * 0.3 * s
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * contrast + mean + brightness
        return x.clamp_(0.0, 1.0)
