"""The request contract between medimg's clients and a served medimg model.

:class:`ModelContract` is what a client reads from the server's model config (input and
output names, image size, channels, normalisation, class names, max batch size, whether
the model is an ensemble that decodes encoded bytes itself); :class:`Prediction` is what
comes back for one image. The request builders here (:func:`request_for`,
:func:`bytes_batch`, :func:`prepare_batch`, :func:`finish_batch`, ...) are the one copy
of the request code that the synchronous and the asyncio clients, ``medimg bench`` and
shared memory use::

    python -c "from serving.clients.contract import client_url, bytes_batch; \
print(client_url('http://127.0.0.1:8000/', 'http'), bytes_batch([b'a', b'b']).shape)"
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from serving.clients.inputs import Item
from serving.repository.model_config import IMAGE_INPUT, SPEC_PARAMETER
from training.errors import ConfigError, DataError, MedimgError, ServingError
from training.spec import ModelSpec

DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
PROTOCOLS = tuple(DEFAULT_PORTS)
T = TypeVar("T")


def default_url(protocol: str, host: str = "127.0.0.1") -> str:
    """``HOST:PORT`` of Triton's default port for ``protocol`` (8000 HTTP, 8001 gRPC)."""
    return f"{host}:{DEFAULT_PORTS[protocol]}"


def client_url(url: str, protocol: str) -> str:
    """``HOST:PORT`` for tritonclient from a ``--url``: empty gives the protocol's default,
    and ``http://HOST:PORT`` (as ``medimg serve`` prints it) is taken for HTTP."""
    if not url:
        return default_url(protocol)
    scheme, sep, rest = url.partition("://")
    address = rest.rstrip("/") if sep and scheme == "http" and protocol == "http" else url
    if "://" in address or "/" in address:
        forms = "HOST:PORT or http://HOST:PORT" if protocol == "http" else "HOST:PORT"
        raise ServingError(f"--url for {protocol}: expected {forms}, got {url!r}")
    return address


def check_protocol(protocol: str) -> None:
    """A :class:`ServingError` unless ``protocol`` is ``http`` or ``grpc``."""
    if protocol not in DEFAULT_PORTS:
        raise ServingError(f"protocol: expected http or grpc, got {protocol!r}")


@dataclass
class Prediction:
    """One image's answer: its label and class probabilities, or the error it met."""

    file: str
    label: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str = ""
    threshold: float | None = None  # binary: the operating threshold on P(finding) used

    @property
    def argmax_label(self) -> str:
        """The most probable class (the label when no operating threshold applies)."""
        return max(self.probabilities, key=self.probabilities.__getitem__, default="")

    @property
    def probability(self) -> float:
        """The probability of the predicted label (NaN for an error)."""
        return self.probabilities.get(self.label, float("nan"))

    def as_json(self) -> str:
        if self.error:
            return json.dumps({"file": self.file, "error": self.error})
        out: dict[str, object] = {"file": self.file, "label": self.label}
        out["probabilities"] = self.probabilities
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return json.dumps(out)

    def as_text(self) -> str:
        if self.error:
            return f"{self.file}\tERROR\t{self.error}"
        return f"{self.file}\t{self.label}\t{self.probability:.4f}"


def _param(config: dict, key: str) -> str:
    value = config.get("parameters", {}).get(key, {})
    return value.get("string_value") or value.get("stringValue") or ""


@dataclass(frozen=True)
class ModelContract:
    """What a client needs to know about a served medimg model, read from its config."""

    model: str  # where encoded bytes go (the ensemble), or the tensor model itself
    tensor_model: str  # where float tensors go: the ensemble's classifier
    spec: ModelSpec
    max_batch_size: int
    accepts_bytes: bool  # an ensemble with the server-side preprocessing step
    outputs: tuple[str, ...] = ()  # the outputs its config declares (() : not known)
    threshold_override: float | None = None  # --threshold: instead of the spec's

    @property
    def threshold(self) -> float | None:
        """Binary models: the operating threshold on P(finding) that decides the label --
        ``--threshold`` if given, else the one training chose on validation (Youden's J,
        in the spec); None (arg-max) for other tasks and versions without one."""
        if self.threshold_override is not None and self.spec.task.startswith("binary"):
            return self.threshold_override
        return self.spec.operating_threshold

    def with_threshold(self, threshold: float | None) -> ModelContract:
        """This contract with ``--threshold`` applied (None: unchanged); a model that is not
        binary, or a value outside [0, 1], is a :class:`ConfigError`."""
        if threshold is None:
            return self
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"--threshold: expected a probability in [0, 1], got {threshold}")
        if not self.spec.task.startswith("binary"):
            raise ConfigError(
                f"--threshold: model {self.model!r} is {self.spec.task}; an operating threshold "
                "applies to binary models only"
            )
        return replace(self, threshold_override=float(threshold))

    @property
    def cam_name(self) -> str:
        """The class-activation-map output the served model declares; "" when it has none
        (a model exported before the maps, or a config that does not declare it)."""
        name = self.spec.cam_name
        return name if name and (not self.outputs or name in self.outputs) else ""

    @classmethod
    def from_config(cls, model: str, config: dict, where: str = "") -> ModelContract:
        """The contract of ``model`` from its config as JSON; ``where`` (the server's
        address) prefixes the error for a model medimg did not export."""
        raw = _param(config, SPEC_PARAMETER)
        if not raw:
            raise ServingError(
                f"{where}: model {model!r} has no {SPEC_PARAMETER!r} parameter; "
                "it was not exported by medimg"
            )
        return cls(
            model=model,
            tensor_model=_param(config, "medimg_classifier") or model,
            spec=ModelSpec.from_json(raw),
            max_batch_size=max(1, int(config.get("max_batch_size", 1))),
            accepts_bytes=config.get("platform") == "ensemble",
            outputs=tuple(o.get("name", "") for o in config.get("output", [])),
        )

    def target(self, array: np.ndarray) -> tuple[str, str]:
        """``(model, input name)`` for one request's input: BYTES [n, 1] go to the
        ensemble's ``image`` input, FP32 (n, C, S, S) to the classifier's."""
        if array.dtype == np.object_:
            return self.model, IMAGE_INPUT
        return self.tensor_model, self.spec.input_name

    def prediction(self, file: str, probs: np.ndarray) -> Prediction:
        """The :class:`Prediction` for one row of the model's output."""
        names = self.spec.class_names
        if len(probs) != len(names):
            raise DataError(f"{self.model}: {len(probs)} outputs but {len(names)} class names")
        threshold = self.threshold
        return Prediction(
            file=file,
            label=names[int(self.spec.predicted(probs, threshold))],
            probabilities={n: float(v) for n, v in zip(names, probs, strict=True)},
            threshold=threshold,
        )


def client_module(protocol: str, *, aio: bool = False) -> Any:
    """``tritonclient.{http,grpc}`` (or their ``.aio``), imported on first use."""
    check_protocol(protocol)
    if protocol == "http":
        if aio:
            import tritonclient.http.aio as mod
        else:
            import tritonclient.http as mod
    elif aio:
        import tritonclient.grpc.aio as mod
    else:
        import tritonclient.grpc as mod
    return mod


def request_for(
    mod: Any, protocol: str, input_name: str, array: np.ndarray, output: str | Sequence[str]
) -> tuple[list, list]:
    """``(inputs, outputs)`` for one infer call asking for ``output`` (one name, or several):
    binary tensors both ways over HTTP. Triton answers with the requested outputs only."""
    datatype = "BYTES" if array.dtype == np.object_ else "FP32"
    inp = mod.InferInput(input_name, list(array.shape), datatype)
    names = [output] if isinstance(output, str) else list(output)
    if protocol == "http":
        inp.set_data_from_numpy(array, binary_data=True)
        return [inp], [mod.InferRequestedOutput(n, binary_data=True) for n in names]
    inp.set_data_from_numpy(array)
    return [inp], [mod.InferRequestedOutput(n) for n in names]


def bytes_batch(images: Sequence[bytes]) -> np.ndarray:
    """Encoded images as the ensemble's ``image`` input: BYTES of shape [n, 1]."""
    return np.array([[bytes(b)] for b in images], dtype=np.object_)


def ready_names(index: Any) -> list[str]:
    """READY model names from a repository index as JSON (a list, or ``{"models": [...]}``)."""
    if isinstance(index, dict):
        index = index.get("models", [])
    return sorted({m["name"] for m in index if m.get("state") == "READY"})


def config_json(answer: dict, protocol: str) -> dict:
    """The model config from a ``get_model_config`` answer as JSON (gRPC wraps it)."""
    return answer["config"] if protocol == "grpc" else answer


def chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def prepare_batch(
    batch: Sequence[Item], contract: ModelContract, tensor: bool
) -> tuple[dict[int, Any], dict[int, Prediction]]:
    """Payloads of the items that could be read, and error predictions for the others."""
    payloads: dict[int, Any] = {}
    results: dict[int, Prediction] = {}
    for i, item in enumerate(batch):
        try:
            payloads[i] = item.payload(contract.spec, tensor=tensor)
        except MedimgError as exc:
            results[i] = Prediction(file=item.name, error=str(exc))
    return payloads, results


def join(payloads: Iterable[Any]) -> np.ndarray:
    """Payloads as one request's input: FP32 tensors stacked, or BYTES [n, 1]."""
    payloads = list(payloads)
    if isinstance(payloads[0], np.ndarray):
        return np.ascontiguousarray(np.concatenate(payloads), dtype=np.float32)
    return bytes_batch(payloads)


def failed(batch: Sequence[Item], payloads: dict[int, Any], exc: Exception) -> dict:
    """An error prediction, naming the file and ``exc``, for every item sent."""
    return {i: Prediction(batch[i].name, error=f"{batch[i].name}: {exc}") for i in payloads}


def finish_batch(
    batch: Sequence[Item],
    probs: dict[int, np.ndarray],
    results: dict[int, Prediction],
    contract: ModelContract,
) -> list[Prediction]:
    """Every item's :class:`Prediction`, in order: the answered ones from ``probs``, the
    others from ``results``."""
    for i, p in probs.items():
        results[i] = contract.prediction(batch[i].name, p)
    return [results[i] for i in range(len(batch))]
