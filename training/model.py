"""torchvision DenseNet-121 adapted to a data set's channels and classes.

    python -c "import torch; from training.model import build_model; \
print(build_model(1, 2)(torch.zeros(2, 1, 64, 64)).shape)"
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import densenet121

from training.errors import ConfigError


def build_model(in_channels: int, num_classes: int) -> nn.Module:
    """DenseNet-121 (random init) with a first conv for ``in_channels`` and a new head."""
    if in_channels not in (1, 3):
        raise ConfigError(f"in_channels: expected 1 or 3, got {in_channels}")
    if num_classes < 2:
        raise ConfigError(f"num_classes: expected >= 2, got {num_classes}")
    model = densenet121(weights=None)
    if in_channels != 3:
        old = model.features.conv0
        model.features.conv0 = nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
        )
    model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    return model


class ProbabilityHead(nn.Module):
    """Wraps a logits model so it returns probabilities: what is exported and served."""

    def __init__(self, model: nn.Module, multi_label: bool) -> None:
        super().__init__()
        self.model = model
        self.multi_label = multi_label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)


def save_weights(model: nn.Module, path: Path, spec_json: str) -> None:
    """State dict plus the model spec (JSON), as one file."""
    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    torch.save({"state_dict": module.state_dict(), "spec": spec_json}, path)


def load_weights(path: Path) -> tuple[dict, str]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob["state_dict"], blob["spec"]


@torch.no_grad()
def predict_proba(model: nn.Module, x, *, multi_label: bool, batch_size: int = 128):
    """Class probabilities (numpy, float32) of a logits model for preprocessed ``x``."""
    import numpy as np

    model = model.module if hasattr(model, "module") else model  # unwrap DDP: no collectives here
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(x), batch_size):
        logits = model(torch.as_tensor(x[start : start + batch_size]).to(device))
        probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)
        out.append(probs.cpu().numpy())
    return np.concatenate(out).astype(np.float32)
