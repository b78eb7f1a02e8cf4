"""An exponential moving average (EMA) of a model's weights, the model that is validated,
checkpointed and exported when ``ema_decay`` is set.

After every optimizer step the average moves towards the trained weights by
``1 - d_t`` with ``d_t = min(ema_decay, (1 + t) / (10 + t))``: the warm-up lets the
average follow the first steps, which matters on small data sets (BreastMNIST has 17
steps an epoch at batch 32, so a plain 0.999 would still be mostly the initial weights
after 40 epochs). Batch-norm running statistics are averaged the same way; integer
buffers (``num_batches_tracked``) are copied::

    medimg train --dataset breastmnist --epochs 40 --ema-decay 0.99
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The EMA of ``model``'s parameters and floating-point buffers, as a module of its own."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay: expected 0 < decay < 1, got {decay!r}")
        self.decay = decay
        self.steps = 0
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay used for update number ``step`` (1-based): warm-up, then ``decay``."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after each step)."""
        self.steps += 1
        weight = 1.0 - self.decay_at(self.steps)
        floats_avg, floats_new = [], []
        for avg, new in zip(_tensors(self.module), _tensors(model), strict=True):
            if avg.is_floating_point():
                floats_avg.append(avg)
                floats_new.append(new.detach())
            else:
                avg.copy_(new)
        if floats_avg:
            torch._foreach_lerp_(floats_avg, floats_new, weight)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the averaged weights: the step count."""
        return {"steps": self.steps, "decay": self.decay}

    def load(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Restore the average from a checkpoint's weights and :meth:`state_dict`."""
        self.module.load_state_dict(weights)
        self.steps = int(state["steps"])


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers, in a fixed order (the same for a model and its deep copy)."""
    return [*model.parameters(), *model.buffers()]
