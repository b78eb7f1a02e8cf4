"""The Python client for medimg models on Triton, over HTTP or gRPC (``tritonclient``).

:class:`TritonClassifier` is the synchronous client; :class:`serving.clients.aio.
AsyncTritonClassifier` the asyncio one. Both read the model's contract (input and
output names, image size, channels, normalisation, class names, max batch size) from
the server's model config through :class:`ModelContract`, and build requests with
:func:`request_for`, so there is one copy of the request code. ``--model NAME`` is the
ensemble medimg exports: by default each item's encoded bytes (PNG, JPEG, DICOM,
``.npy``) go to it and the server decodes and preprocesses them; with
``client_preprocess=True`` the client does that and sends float tensors to the
ensemble's classifier ``NAME_onnx``::

    python -c "from serving.clients.sync import TritonClassifier as C; \
c = C('127.0.0.1:8001', 'grpc'); print(next(c.classify_files(['../shared/data/samples/00000001_000.png'])))"
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.clients.inputs import Item, file_items
from serving.repository.model_config import IMAGE_INPUT, SPEC_PARAMETER
from training.errors import DataError, MedimgError, RequestRefused, ServingError
from training.spec import ModelSpec

DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
PROTOCOLS = tuple(DEFAULT_PORTS)


def default_url(protocol: str, host: str = "127.0.0.1") -> str:
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
    if protocol not in DEFAULT_PORTS:
        raise ServingError(f"protocol: expected http or grpc, got {protocol!r}")


@dataclass
class Prediction:
    file: str
    label: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def probability(self) -> float:
        return self.probabilities.get(self.label, float("nan"))

    def as_json(self) -> str:
        if self.error:
            return json.dumps({"file": self.file, "error": self.error})
        return json.dumps(
            {"file": self.file, "label": self.label, "probabilities": self.probabilities}
        )

    def as_text(self) -> str:
        if self.error:
            return f"{self.file}\tERROR\t{self.error}"
        return f"{self.file}\t{self.label}\t{self.probability:.4f}"


def serving_error(message: str, exc: Exception) -> ServingError:
    """:class:`RequestRefused` when the server refused the input (HTTP 4xx, gRPC
    INVALID_ARGUMENT), else :class:`ServingError` (unreachable, timed out, server error)."""
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    refused = str(status).startswith("4") or status == "StatusCode.INVALID_ARGUMENT"
    return (RequestRefused if refused else ServingError)(message)


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

    @classmethod
    def from_config(cls, model: str, config: dict, where: str = "") -> ModelContract:
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
        )

    def prediction(self, file: str, probs: np.ndarray) -> Prediction:
        names = self.spec.class_names
        if len(probs) != len(names):
            raise DataError(f"{self.model}: {len(probs)} outputs but {len(names)} class names")
        return Prediction(
            file=file,
            label=names[int(np.argmax(probs))],
            probabilities={n: float(v) for n, v in zip(names, probs, strict=True)},
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


def request_for(mod: Any, protocol: str, input_name: str, array: np.ndarray, output: str):
    """``(inputs, outputs)`` for one infer call: binary tensors both ways over HTTP."""
    datatype = "BYTES" if array.dtype == np.object_ else "FP32"
    inp = mod.InferInput(input_name, list(array.shape), datatype)
    if protocol == "http":
        inp.set_data_from_numpy(array, binary_data=True)
        return [inp], [mod.InferRequestedOutput(output, binary_data=True)]
    inp.set_data_from_numpy(array)
    return [inp], [mod.InferRequestedOutput(output)]


def bytes_batch(images: Sequence[bytes]) -> np.ndarray:
    """Encoded images as the ensemble's ``image`` input: BYTES of shape [n, 1]."""
    return np.array([[bytes(b)] for b in images], dtype=np.object_)


def ready_names(index: Any, protocol: str) -> list[str]:
    """READY model names from a repository index answer (gRPC protobuf, HTTP JSON or dict)."""
    if protocol == "grpc" and not isinstance(index, dict | list):
        index = [{"name": m.name, "state": m.state} for m in index.models]
    if isinstance(index, dict):
        index = index.get("models", [])
    return sorted({m["name"] for m in index if m.get("state") == "READY"})


def config_json(answer: dict, protocol: str) -> dict:
    return answer["config"] if protocol == "grpc" else answer


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
    return {i: Prediction(batch[i].name, error=f"{batch[i].name}: {exc}") for i in payloads}


def finish_batch(
    batch: Sequence[Item],
    probs: dict[int, np.ndarray],
    results: dict[int, Prediction],
    contract: ModelContract,
) -> list[Prediction]:
    for i, p in probs.items():
        results[i] = contract.prediction(batch[i].name, p)
    return [results[i] for i in range(len(batch))]


class TritonClassifier:
    """A synchronous connection to one medimg classifier on a Triton server."""

    def __init__(
        self,
        url: str = "",
        protocol: str = "http",
        model: str = "",
        timeout_s: float = 60.0,
        *,
        client_preprocess: bool = False,
    ) -> None:
        self._mod = client_module(protocol)
        self.protocol = protocol
        self.url = client_url(url, protocol)
        self.timeout_s = timeout_s
        try:
            if protocol == "http":
                self._client = self._mod.InferenceServerClient(
                    self.url, connection_timeout=timeout_s, network_timeout=timeout_s
                )
            else:
                self._client = self._mod.InferenceServerClient(self.url)
            live = self._client.is_server_live()
        except Exception as exc:
            raise ServingError(
                f"cannot reach a Triton server at {self.url} over {protocol}: {exc}"
            ) from exc
        try:  # a failed connect closes its connection
            if not live:
                raise ServingError(f"Triton server at {self.url} is not live")
            name = model or self._only_ensemble()
            self.contract = ModelContract.from_config(name, self._model_config(name), self.url)
        except BaseException:
            self._client.close()
            raise
        # a model that is not an ensemble takes tensors: preprocess here whatever was asked
        self.client_preprocess = client_preprocess or not self.contract.accepts_bytes

    # the contract, under the names callers used before it existed
    model = property(lambda self: self.contract.model)
    spec = property(lambda self: self.contract.spec)
    tensor_model = property(lambda self: self.contract.tensor_model)
    max_batch_size = property(lambda self: self.contract.max_batch_size)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise serving_error(f"{self.url} ({self.protocol}): {what} failed: {exc}", exc) from exc

    def _only_ensemble(self) -> str:
        """The one medimg ensemble ready on the server (its steps are not candidates)."""
        index = self._call("repository index", self._client.get_model_repository_index)
        ready = ready_names(index, self.protocol)
        ensembles = [n for n in ready if self._model_config(n).get("platform") == "ensemble"]
        if len(ensembles) != 1:
            raise ServingError(
                f"{self.url}: pass --model; models ready on this server: {ready or 'none'}"
            )
        return ensembles[0]

    def _model_config(self, model: str) -> dict:
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        answer = self._call(
            f"model config of {model!r}", self._client.get_model_config, model, **kwargs
        )
        return config_json(answer, self.protocol)

    def _run(self, model: str, name: str, array: np.ndarray) -> np.ndarray:
        output = self.spec.output_name
        inputs, outputs = request_for(self._mod, self.protocol, name, array, output)
        result = self._call(
            f"inference on {model!r}", self._client.infer, model, inputs, outputs=outputs
        )
        return result.as_numpy(output)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for preprocessed float32 (N, C, S, S), sent to the classifier in
        max_batch_size chunks."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = [
            self._run(self.tensor_model, self.spec.input_name, x[s : s + self.max_batch_size])
            for s in range(0, len(x), self.max_batch_size)
        ]
        return np.concatenate(out)

    def infer_bytes(self, images: Sequence[bytes]) -> np.ndarray:
        """Probabilities for encoded images (PNG, JPEG, DICOM, .npy), decoded and
        preprocessed by the server's ensemble, sent in max_batch_size chunks."""
        out = [
            self._run(self.model, IMAGE_INPUT, bytes_batch(part))
            for part in chunks(list(images), self.max_batch_size)
        ]
        return np.concatenate(out)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return self.spec.preprocess(image[None])

    def _send(self, array: np.ndarray) -> np.ndarray:
        """One request: BYTES to the ensemble, FP32 to the classifier."""
        if array.dtype == np.object_:
            return self._run(self.model, IMAGE_INPUT, array)
        return self._run(self.tensor_model, self.spec.input_name, array)

    def classify_items(self, items: Sequence[Item], batch_size: int = 0) -> Iterator[Prediction]:
        """One :class:`Prediction` per item, in order; a bad item carries an error. Items go
        ``batch_size`` (default: the model's max) per request; a batch the server refuses
        (one file it cannot decode) is retried item by item."""
        size = min(batch_size or self.max_batch_size, self.max_batch_size)
        for batch in chunks(list(items), size):
            payloads, results = prepare_batch(batch, self.contract, self.client_preprocess)
            probs: dict[int, np.ndarray] = {}
            if payloads:
                try:
                    probs = dict(zip(payloads, self._send(join(payloads.values())), strict=True))
                except RequestRefused:  # one bad file refuses the batch: retry one by one
                    for i, payload in payloads.items():
                        try:
                            probs[i] = self._send(join([payload]))[0]
                        except ServingError as exc:
                            results[i] = Prediction(batch[i].name, error=f"{batch[i].name}: {exc}")
                except ServingError as exc:  # the server, not the input: every item fails
                    results.update(failed(batch, payloads, exc))
            yield from finish_batch(batch, probs, results, self.contract)

    def classify_files(self, files: Sequence[str | Path]) -> Iterator[Prediction]:
        """One :class:`Prediction` per file, in order; bad files carry an error."""
        return self.classify_items(file_items(files))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
