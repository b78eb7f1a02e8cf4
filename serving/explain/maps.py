"""Class activation maps of images, from a Triton server or in process, as
:class:`Explanation` objects (what :mod:`serving.explain.overlay` draws).

:class:`ServerExplainer` asks a served medimg model for its ``cam`` output beside the
probabilities (image bytes to the ensemble, or tensors with ``--client-preprocess``);
:class:`LocalExplainer` runs the registered model in this process, with the same
preprocessing as the server's ``NAME_preprocess`` (``ModelSpec.preprocess``), so both give
the same maps (to 1e-4, tests/integration/test_explain.py). In process, ``gradcam_layer``
replaces the CAM by Grad-CAM of that layer (:func:`training.cam.grad_cam`)::

    python -c "from serving.clients.sync import TritonClassifier; \
from serving.clients.inputs import collect_items; from serving.explain.maps import ServerExplainer; \
items, _ = collect_items(['../shared/data/samples']); \
print([e.as_text() for e in ServerExplainer(TritonClassifier('127.0.0.1:8001', 'grpc')).explain(items)])"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from serving.clients.contract import chunks, join, prepare_batch
from serving.clients.inputs import Item
from training.errors import ConfigError, MedimgError, RequestRefused, ServingError
from training.spec import ModelSpec

if TYPE_CHECKING:
    from serving.clients.sync import TritonClassifier
    from training.registry import LoadedModel

LOCAL_BATCH = 16


@dataclass
class Explanation:
    """One image's prediction and the map of one class (or the error it met)."""

    file: str
    label: str = ""  # the predicted class
    probabilities: dict[str, float] = field(default_factory=dict)
    explained: str = ""  # the class the map is of
    heatmap: np.ndarray | None = None  # float32 (h, w): CAM (feature-map size) or Grad-CAM
    method: str = "cam"  # "cam" or "gradcam LAYER"
    error: str = ""
    path: Path | None = None  # the overlay written, once written

    @property
    def probability(self) -> float:
        """The probability of the predicted class (NaN for an error)."""
        return self.probabilities.get(self.label, float("nan"))

    @property
    def explained_probability(self) -> float:
        return self.probabilities.get(self.explained, float("nan"))

    def as_text(self) -> str:
        if self.error:
            return f"{self.file}\tERROR\t{self.error}"
        where = f"\t{self.path}" if self.path is not None else ""
        return (
            f"{self.file}\t{self.label}\t{self.probability:.4f}\t{self.method} of "
            f"{self.explained}\t{self.explained_probability:.4f}{where}"
        )


class Explainer(Protocol):
    """What :func:`serving.explain.overlay.write_overlays` takes: a model's spec and maps."""

    @property
    def spec(self) -> ModelSpec: ...

    def explain(
        self, items: Sequence[Item], class_name: str = "", batch_size: int = 0
    ) -> list[Explanation]: ...


def class_index(spec: ModelSpec, name: str) -> int:
    """The column of class ``name`` (any case); a :class:`ConfigError` naming the classes."""
    for i, known in enumerate(spec.class_names):
        if known.lower() == name.lower():
            return i
    raise ConfigError(f"--class {name!r}: the model's classes are {list(spec.class_names)}")


def explanation(
    spec: ModelSpec, file: str, probs: np.ndarray, maps: np.ndarray, class_name: str = ""
) -> Explanation:
    """The :class:`Explanation` of one image from its probabilities (K,) and maps (K, h, w):
    the map of ``class_name``, else of the predicted class (a binary model's: at its
    operating threshold, as ``classify`` labels it)."""
    names = spec.class_names
    if len(probs) != len(names) or len(maps) != len(names):
        raise ServingError(
            f"{file}: {len(probs)} probabilities, {len(maps)} maps, {len(names)} classes"
        )
    predicted = int(spec.predicted(probs))
    chosen = class_index(spec, class_name) if class_name else predicted
    return Explanation(
        file=file,
        label=names[predicted],
        probabilities={n: float(v) for n, v in zip(names, probs, strict=True)},
        explained=names[chosen],
        heatmap=np.asarray(maps[chosen], dtype=np.float32),
    )


def no_cam_message(model: str, where: str) -> str:
    return (
        f"model {model!r}{where} has no class-activation-map output: it was exported before "
        "medimg exported maps (or its config does not declare one); re-export it with "
        "`medimg export` or `medimg publish`"
    )


class ServerExplainer:
    """Maps from a served model: each request asks for the probabilities and the maps."""

    def __init__(self, client: TritonClassifier) -> None:
        contract = client.contract
        if not contract.cam_name:
            raise ServingError(no_cam_message(contract.model, f" on {client.url}"))
        self.client = client
        self.outputs = (contract.spec.output_name, contract.cam_name)

    @property
    def spec(self) -> ModelSpec:
        return self.client.contract.spec

    def _send(self, payloads: Sequence) -> tuple[np.ndarray, np.ndarray]:
        answer = self.client.infer_outputs(join(payloads), self.outputs)
        return answer[self.outputs[0]], answer[self.outputs[1]]

    def explain(
        self, items: Sequence[Item], class_name: str = "", batch_size: int = 0
    ) -> list[Explanation]:
        """One :class:`Explanation` per item, in order; a batch the server refuses (one
        file it cannot decode) is retried item by item, so a bad file costs its own line."""
        if class_name:
            class_index(self.spec, class_name)  # before any request
        contract, out = self.client.contract, []
        size = min(batch_size or contract.max_batch_size, contract.max_batch_size)
        for batch in chunks(list(items), size):
            payloads, failed = prepare_batch(batch, contract, self.client.client_preprocess)
            rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            errors = {i: p.error for i, p in failed.items()}
            if payloads:
                try:
                    probs, maps = self._send(list(payloads.values()))
                    rows = {i: (probs[k], maps[k]) for k, i in enumerate(payloads)}
                except RequestRefused:
                    for i, payload in payloads.items():
                        try:
                            probs, maps = self._send([payload])
                            rows[i] = (probs[0], maps[0])
                        except ServingError as exc:
                            errors[i] = f"{batch[i].name}: {exc}"
                except ServingError as exc:
                    errors.update({i: f"{batch[i].name}: {exc}" for i in payloads})
            for i, item in enumerate(batch):
                if i in rows:
                    out.append(explanation(contract.spec, item.name, *rows[i], class_name))
                else:
                    out.append(Explanation(file=item.name, error=errors[i]))
        return out


class LocalExplainer:
    """Maps from a model loaded in this process (``training.registry.load_model``): CAM
    (the exported second output, computed by :class:`training.cam.CamHead`), or Grad-CAM of
    ``gradcam_layer``."""

    def __init__(self, loaded: LoadedModel, gradcam_layer: str = "") -> None:
        from training.cam import CamHead, GradCamNetwork

        head = CamHead.from_head(loaded.module)
        if head is None:
            raise ConfigError(
                f"{loaded.uri}: this model cannot give class activation maps (not a "
                "DenseNet-121 with its weights; a model logged with pickle before medimg "
                "logged weights)"
            )
        if gradcam_layer:
            GradCamNetwork(head.model).layer(gradcam_layer)  # a bad name fails here
        self.head, self.gradcam_layer = head, gradcam_layer
        self._spec = loaded.spec

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def explain(
        self, items: Sequence[Item], class_name: str = "", batch_size: int = 0
    ) -> list[Explanation]:
        """One :class:`Explanation` per item, in order; an unreadable file gets its error."""
        from training.cam import class_activation_maps, grad_cam

        if class_name:
            class_index(self.spec, class_name)
        out: list[Explanation] = []
        for batch in chunks(list(items), batch_size or LOCAL_BATCH):
            tensors: dict[int, np.ndarray] = {}
            errors: dict[int, str] = {}
            for i, item in enumerate(batch):
                try:
                    tensors[i] = np.asarray(item.payload(self.spec, tensor=True))
                except MedimgError as exc:
                    errors[i] = str(exc)
            done: dict[int, Explanation] = {}
            if tensors:
                x = np.concatenate(list(tensors.values()))
                probs, maps = class_activation_maps(self.head, x)
                for k, i in enumerate(tensors):
                    done[i] = explanation(self.spec, batch[i].name, probs[k], maps[k], class_name)
                if self.gradcam_layer:
                    chosen = [self.spec.class_names.index(done[i].explained) for i in tensors]
                    heat = grad_cam(self.head.model, x, self.gradcam_layer, chosen)
                    for k, i in enumerate(tensors):
                        done[i].heatmap, done[i].method = heat[k], f"gradcam {self.gradcam_layer}"
            out += [
                done.get(i) or Explanation(batch[i].name, error=errors[i])
                for i in range(len(batch))
            ]
        return out
