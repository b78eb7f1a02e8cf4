"""Class activation maps: CheXNet's CAM as a second model output, and Grad-CAM of any layer
in process (through the ``grad-cam`` library, pytorch-grad-cam).

:class:`CamHead` is what ``medimg export`` exports: the served probabilities (exactly
:class:`~training.model.ProbabilityHead`'s) and, per class, the map ``cam[n, k] =
W[k] . relu(features(x)[n]) / T[k]`` at the feature-map resolution (DenseNet-121: the
input size / 32, 2 x 2 at 64 px, 7 x 7 at 224 px). The classifier's bias is left out: it
is the same at every location, so it moves no part of the map; then
``cam.mean(axis=(2, 3)) + b / T`` is the calibrated logit. No gradients are needed, so
the ONNX graph, Triton and TensorRT compute it like any other output::

    python -c "import torch; from training.model import build_model; from training.cam import CamHead; \
p, cam = CamHead(build_model(1, 2), False)(torch.zeros(1, 1, 64, 64)); print(p.shape, cam.shape)"

Grad-CAM (:func:`grad_cam`) runs on :class:`GradCamNetwork`, a copy of the network whose
ReLUs are not in place: torchvision's DenseNet applies ``F.relu(..., inplace=True)`` to
``features.norm5``'s output, which silently turns the activation the library keeps into
the rectified one while its gradient stays the unrectified one's (Grad-CAM of
``features.norm5`` on the torchvision module differs from the correct one by up to 0.36 of
the map's range). On the copy every layer works; ``relu`` names the rectified last feature
map, whose Grad-CAM is the CAM of that class, rectified and scaled to [0, 1].
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.errors import ConfigError
from training.model import ProbabilityHead

FINAL_LAYER = "relu"  # GradCamNetwork's rectified last feature map


def has_cam_parts(network: nn.Module) -> bool:
    """Whether ``network`` is shaped like torchvision's DenseNet: ``features`` (a module
    returning the last feature map) and ``classifier`` (one ``nn.Linear`` after global
    average pooling of the rectified map)."""
    return isinstance(getattr(network, "features", None), nn.Module) and isinstance(
        getattr(network, "classifier", None), nn.Linear
    )


def _parts(network: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(network.features, network.classifier)``, typed."""
    features, classifier = getattr(network, "features", None), getattr(network, "classifier", None)
    if not isinstance(features, nn.Module) or not isinstance(classifier, nn.Linear):
        raise ConfigError(
            f"class activation maps need a network with .features and a Linear "
            f".classifier (DenseNet-121); got {type(network).__name__}"
        )
    return features, classifier


def _temperature(values: Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor(tuple(values) or (1.0,), dtype=torch.float32).reshape(1, -1)
    if not bool((t > 0).all()):
        raise ConfigError(f"temperature: expected values > 0, got {t.flatten().tolist()}")
    return t


class CamHead(nn.Module):
    """``network`` -> (calibrated probabilities (N, K), class activation maps (N, K, h, w)).

    The probabilities are computed with the same operations as
    :class:`~training.model.ProbabilityHead` (features, ReLU, global average pooling,
    classifier, / temperature, softmax or sigmoid), so they are equal to its output; the
    ReLU is not in place, so the feature map stays available for the maps. A map is a
    1 x 1 convolution with the classifier's weights (ONNX ``Conv``, which ONNX Runtime
    also runs in float16 and TensorRT builds), divided by the class's temperature."""

    def __init__(
        self, network: nn.Module, multi_label: bool, temperature: Sequence[float] = (1.0,)
    ) -> None:
        super().__init__()
        _parts(network)
        self.model = network
        self.multi_label = multi_label
        self.register_buffer("temperature", _temperature(temperature), persistent=False)

    @classmethod
    def from_head(cls, head: nn.Module) -> CamHead | None:
        """The CAM head over a :class:`ProbabilityHead`'s network and temperature, or None
        for a module it cannot take apart (a model logged with pickle before the weights
        format, of unknown structure)."""
        if not isinstance(head, ProbabilityHead) or not has_cam_parts(head.model):
            return None
        t = head.temperature
        assert isinstance(t, torch.Tensor)
        return cls(head.model, head.multi_label, tuple(t.flatten().tolist())).eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extract, classifier = _parts(self.model)
        features = F.relu(extract(x))  # not in place: the maps need it
        pooled = torch.flatten(F.adaptive_avg_pool2d(features, (1, 1)), 1)
        t = self.temperature
        assert isinstance(t, torch.Tensor)
        logits = classifier(pooled) / t
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)
        cam = F.conv2d(features, classifier.weight[:, :, None, None]) / t[:, :, None, None]
        return probs, cam


@torch.no_grad()
def class_activation_maps(
    head: CamHead, x: np.ndarray, *, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, K), maps (N, K, h, w)), float32 numpy, of preprocessed ``x``."""
    head.eval()
    probs, maps = [], []
    for start in range(0, len(x), batch_size):
        p, m = head(torch.as_tensor(np.ascontiguousarray(x[start : start + batch_size])))
        probs.append(p.numpy())
        maps.append(m.numpy())
    return np.concatenate(probs).astype(np.float32), np.concatenate(maps).astype(np.float32)


class GradCamNetwork(nn.Module):
    """A copy of ``network`` computing the same logits without in-place operations, for
    hook-based libraries: its ReLU modules are not in place, and the last ReLU (functional
    and in place in torchvision's DenseNet) is the module ``relu``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        _parts(network)
        self.network = copy.deepcopy(network).eval()
        for module in self.network.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extract, classifier = _parts(self.network)
        features = self.relu(extract(x))
        return classifier(torch.flatten(F.adaptive_avg_pool2d(features, (1, 1)), 1))

    def layer_names(self) -> list[str]:
        """The names :meth:`layer` accepts: ``relu`` and every module under ``features``."""
        names = [n for n, _ in self.network.named_modules() if n.startswith("features.")]
        return [FINAL_LAYER, *names]

    def layer(self, name: str) -> nn.Module:
        """The module called ``name`` (``features.denseblock3``, ``features.norm5``, ``relu``)."""
        if name == FINAL_LAYER:
            return self.relu
        if name.startswith("features.") or name == "features":
            try:
                return self.network.get_submodule(name)
            except AttributeError:
                pass
        blocks = [n for n in self.layer_names() if n.count(".") <= 1]
        raise ConfigError(f"--gradcam {name!r}: no such layer; try one of {blocks}")


def grad_cam(
    network: nn.Module, x: np.ndarray, layer: str, class_indices: Sequence[int]
) -> np.ndarray:
    """Grad-CAM (pytorch-grad-cam's ``GradCAM``) of ``layer`` for ``class_indices[i]`` of
    image ``x[i]`` (preprocessed, (N, C, S, S)): float32 (N, S, S), each rectified and
    scaled to [0, 1] by the library, at the input's resolution. ``network``: the logits
    network (``ProbabilityHead.model``); the class ranking, hence the map, does not depend
    on the temperature."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if len(class_indices) != len(x):
        raise ConfigError(f"grad_cam: {len(x)} images but {len(class_indices)} classes")
    model = GradCamNetwork(network)
    target = model.layer(layer)
    with GradCAM(model=model, target_layers=[target]) as cam:
        maps = cam(
            input_tensor=torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)),
            targets=[ClassifierOutputTarget(int(i)) for i in class_indices],
        )
    return np.asarray(maps, dtype=np.float32)
