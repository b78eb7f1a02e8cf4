"""torchvision DenseNet-121 adapted to a data set's channels and classes.

    python -c "import torch; from training.model import build_model; \
print(build_model(1, 2)(torch.zeros(2, 1, 64, 64)).shape)"
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn
from torchvision.models import densenet121

from training.errors import ConfigError

log = logging.getLogger(__name__)
# torchvision's own fix for DenseNet checkpoints saved with old key names ("norm.1" -> "norm1")
_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_PREFIXES = ("module.", "densenet121.", "model.", "backbone.")


def build_model(in_channels: int, num_classes: int, pretrained_weights: str = "") -> nn.Module:
    """DenseNet-121 with a first conv for ``in_channels`` and a new ``num_classes`` head;
    random init, or the features of a local ``pretrained_weights`` file (see
    :func:`load_pretrained`)."""
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
    if pretrained_weights:
        load_pretrained(model, Path(pretrained_weights))
    return model


def _clean_key(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    match = _OLD_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def load_pretrained(model: nn.Module, path: Path) -> None:
    """Load DenseNet-121 feature weights from a local file into ``model`` (in place).

    Accepts torchvision's ImageNet ``densenet121-*.pth`` state dict and CheXNet-style
    checkpoints (``{"state_dict": ...}``, keys prefixed ``module.densenet121.``, old
    ``norm.1`` names). The 3-channel first conv is summed over its input channels for
    1-channel models (equivalent for grey images replicated to RGB); the classifier
    head is always the new one. Nothing is downloaded.
    """
    if not path.is_file():
        raise ConfigError(f"pretrained_weights: no such file {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"pretrained_weights: {path} is not a PyTorch weights file: {exc}"
        ) from exc
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict) or not blob:
        raise ConfigError(f"pretrained_weights: {path} holds no state dict")
    source = {_clean_key(k): v for k, v in blob.items() if isinstance(v, torch.Tensor)}
    target = model.state_dict()
    conv = "features.conv0.weight"
    if conv in source and source[conv].shape[1] != target[conv].shape[1]:
        if target[conv].shape[1] == 1:
            source[conv] = source[conv].sum(dim=1, keepdim=True)
        else:
            raise ConfigError(
                f"pretrained_weights: {path}: first conv has {source[conv].shape[1]} input "
                f"channels, the model {target[conv].shape[1]}"
            )
    features = {k: v for k, v in source.items() if k.startswith("features.")}
    missing = sorted(
        k
        for k in target
        if k.startswith("features.")
        and k not in features
        and not k.endswith("num_batches_tracked")  # absent from older checkpoints
    )
    wrong = sorted(k for k, v in features.items() if k in target and v.shape != target[k].shape)
    if missing or wrong or not features:
        raise ConfigError(
            f"pretrained_weights: {path} is not a DenseNet-121 checkpoint: "
            f"{len(missing)} feature tensors missing (e.g. {missing[:3]}), "
            f"{len(wrong)} with other shapes (e.g. {wrong[:3]})"
        )
    model.load_state_dict(features, strict=False)
    log.info("loaded %d pretrained feature tensors from %s (new head)", len(features), path)


class ProbabilityHead(nn.Module):
    """Wraps a logits model so it returns calibrated probabilities: what is exported and
    served. ``temperature``: one value (softmax) or one per label (sigmoid); the logits are
    divided by it before the softmax / sigmoid (1.0: uncalibrated)."""

    def __init__(self, model: nn.Module, multi_label: bool, temperature=(1.0,)) -> None:
        super().__init__()
        self.model = model
        self.multi_label = multi_label
        t = torch.as_tensor(tuple(temperature) or (1.0,), dtype=torch.float32).reshape(1, -1)
        if not bool((t > 0).all()):
            raise ConfigError(f"temperature: expected values > 0, got {t.flatten().tolist()}")
        self.register_buffer("temperature", t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x) / self.temperature
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper, or ``model`` itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def save_weights(model: nn.Module, path: Path, spec_json: str) -> None:
    """State dict plus the model spec (JSON), as one file: plain tensors and a string,
    read back by :func:`load_weights` with ``torch.load(weights_only=True)``."""
    torch.save({"state_dict": unwrap(model).state_dict(), "spec": spec_json}, path)


def load_weights(path: Path) -> tuple[dict, str]:
    """(state dict, spec JSON) of a :func:`save_weights` file; no code is unpickled."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob["state_dict"], blob["spec"]


@torch.no_grad()
def predict_logits(model: nn.Module, x, *, batch_size: int = 128):
    """Logits (numpy, float32) of a logits model for preprocessed ``x``."""
    import numpy as np

    model = unwrap(model)  # unwrap DDP: no collectives here
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(x), batch_size):
        out.append(
            model(torch.as_tensor(x[start : start + batch_size]).to(device)).float().cpu().numpy()
        )
    return np.concatenate(out).astype(np.float32)


def probabilities(logits, *, multi_label: bool, temperature=(1.0,)):
    """float32 probabilities of ``logits`` divided by ``temperature``, computed as
    :class:`ProbabilityHead` computes them (torch, float32), so they match the export."""
    t = torch.as_tensor(tuple(temperature) or (1.0,), dtype=torch.float32).reshape(1, -1)
    z = torch.as_tensor(logits, dtype=torch.float32) / t
    return (torch.sigmoid(z) if multi_label else torch.softmax(z, dim=1)).numpy()


def predict_proba(
    model: nn.Module, x, *, multi_label: bool, batch_size: int = 128, temperature=(1.0,)
):
    """Class probabilities (numpy, float32) of a logits model for preprocessed ``x``."""
    logits = predict_logits(model, x, batch_size=batch_size)
    return probabilities(logits, multi_label=multi_label, temperature=temperature)
