"""Classify images through a running Triton server, over HTTP or gRPC (``tritonclient``).

``--model NAME`` is the ensemble medimg exports: by default the client sends each
file's raw bytes (PNG, JPEG, DICOM, ``.npy``) and the server decodes and preprocesses
them. With ``client_preprocess=True`` it reads and preprocesses the files here, with
the contract (image size, channels, normalisation, class names) from the server's
model config, and sends float tensors to the ensemble's classifier ``NAME_onnx``::

    medimg classify ../shared/data/samples/00000001_000.png --protocol grpc --json
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.model_configs import IMAGE_INPUT, SPEC_PARAMETER
from training.errors import DataError, MedimgError, ServingError
from training.images import read_image
from training.spec import ModelSpec

DEFAULT_PORTS = {"http": 8000, "grpc": 8001}


def default_url(protocol: str, host: str = "127.0.0.1") -> str:
    return f"{host}:{DEFAULT_PORTS[protocol]}"


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


class TritonClassifier:
    """One connection to one classifier model on a Triton server."""

    def __init__(
        self,
        url: str = "",
        protocol: str = "http",
        model: str = "",
        timeout_s: float = 60.0,
        *,
        client_preprocess: bool = False,
    ) -> None:
        if protocol not in DEFAULT_PORTS:
            raise ServingError(f"protocol: expected http or grpc, got {protocol!r}")
        self.protocol = protocol
        self.url = url or default_url(protocol)
        self.timeout_s = timeout_s
        if protocol == "http":
            import tritonclient.http as client_mod
        else:
            import tritonclient.grpc as client_mod
        self._mod = client_mod
        try:
            if protocol == "http":
                self._client = client_mod.InferenceServerClient(
                    self.url, connection_timeout=timeout_s, network_timeout=timeout_s
                )
            else:
                self._client = client_mod.InferenceServerClient(self.url)
            live = self._client.is_server_live()
        except Exception as exc:
            raise ServingError(
                f"cannot reach a Triton server at {self.url} over {protocol}: {exc}"
            ) from exc
        if not live:
            raise ServingError(f"Triton server at {self.url} is not live")
        self.model = model or self._only_model()
        self.config = self._model_config(self.model)
        self.spec = self._spec_from_config()
        self.max_batch_size = max(1, int(self.config.get("max_batch_size", 1)))
        # a model that is not an ensemble takes tensors: preprocess here whatever was asked
        self.client_preprocess = client_preprocess or self.config.get("platform") != "ensemble"
        # tensors go to the classifier behind the ensemble (or to the model itself)
        self.tensor_model = self._param("medimg_classifier") or self.model

    def _param(self, key: str) -> str:
        value = self.config.get("parameters", {}).get(key, {})
        return value.get("string_value") or value.get("stringValue") or ""

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise ServingError(f"{self.url} ({self.protocol}): {what} failed: {exc}") from exc

    def _only_model(self) -> str:
        """The one medimg ensemble ready on the server (its steps are not candidates)."""
        index = self._call("repository index", self._client.get_model_repository_index)
        if self.protocol == "grpc":
            index = [{"name": m.name, "state": m.state} for m in index.models]
        ready = sorted({m["name"] for m in index if m.get("state") == "READY"})
        ensembles = [
            name for name in ready if self._model_config(name).get("platform") == "ensemble"
        ]
        if len(ensembles) != 1:
            raise ServingError(
                f"{self.url}: pass --model; models ready on this server: {ready or 'none'}"
            )
        return ensembles[0]

    def _model_config(self, model: str) -> dict:
        if self.protocol == "grpc":
            config = self._call(
                f"model config of {model!r}", self._client.get_model_config, model, as_json=True
            )["config"]
        else:
            config = self._call(f"model config of {model!r}", self._client.get_model_config, model)
        return config

    def _spec_from_config(self) -> ModelSpec:
        raw = self._param(SPEC_PARAMETER)
        if not raw:
            raise ServingError(
                f"{self.url}: model {self.model!r} has no {SPEC_PARAMETER!r} parameter; "
                "it was not exported by medimg"
            )
        return ModelSpec.from_json(raw)

    def _run(self, model: str, name: str, chunk: np.ndarray, datatype: str) -> np.ndarray:
        inp = self._mod.InferInput(name, list(chunk.shape), datatype)
        if self.protocol == "http":
            inp.set_data_from_numpy(chunk, binary_data=True)
            outputs = [self._mod.InferRequestedOutput(self.spec.output_name, binary_data=True)]
        else:
            inp.set_data_from_numpy(chunk)
            outputs = [self._mod.InferRequestedOutput(self.spec.output_name)]
        result = self._call(
            f"inference on {model!r}", self._client.infer, model, [inp], outputs=outputs
        )
        return result.as_numpy(self.spec.output_name)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for preprocessed float32 (N, C, S, S), sent to the classifier in
        max_batch_size chunks."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = []
        for start in range(0, len(x), self.max_batch_size):
            chunk = x[start : start + self.max_batch_size]
            out.append(self._run(self.tensor_model, self.spec.input_name, chunk, "FP32"))
        return np.concatenate(out)

    def infer_bytes(self, images: Sequence[bytes]) -> np.ndarray:
        """Probabilities for encoded images (PNG, JPEG, DICOM, .npy), decoded and
        preprocessed by the server's ensemble, sent in max_batch_size chunks."""
        out = []
        for start in range(0, len(images), self.max_batch_size):
            chunk = np.array(
                [[bytes(b)] for b in images[start : start + self.max_batch_size]], dtype=np.object_
            )
            out.append(self._run(self.model, IMAGE_INPUT, chunk, "BYTES"))
        return np.concatenate(out)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return self.spec.preprocess(image[None])

    def _read(self, path: str | Path) -> np.ndarray | bytes:
        if self.client_preprocess:
            return self.preprocess(read_image(path))
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}") from exc

    def _infer_each_or_batch(self, items, ok, batch, results) -> np.ndarray:
        """One request for the batch; when the server refuses it (a file it cannot decode),
        each file alone, so one bad file costs only its own result."""
        try:
            return self.infer_bytes(items)
        except ServingError:
            probs, keep = [], []
            for i, data in zip(list(ok), items, strict=True):
                try:
                    probs.append(self.infer_bytes([data])[0])
                    keep.append(i)
                except ServingError as exc:
                    results[i] = Prediction(file=str(batch[i]), error=f"{batch[i]}: {exc}")
            ok[:] = keep
            return np.array(probs)

    def classify_files(self, files: Sequence[str | Path]) -> Iterator[Prediction]:
        """One :class:`Prediction` per file, in order; bad files carry an error, not an exception."""
        for batch in _chunks(list(files), self.max_batch_size):
            items, ok = [], []
            results: dict[int, Prediction] = {}
            for i, path in enumerate(batch):
                try:
                    items.append(self._read(path))
                    ok.append(i)
                except MedimgError as exc:
                    results[i] = Prediction(file=str(path), error=str(exc))
            if items and not self.client_preprocess:
                probs = self._infer_each_or_batch(items, ok, batch, results)
            elif items:
                probs = self.infer(np.concatenate(items))
            if items:
                for i, p in zip(ok, probs, strict=True):
                    results[i] = self._prediction(str(batch[i]), p)
            for i in range(len(batch)):
                yield results[i]

    def _prediction(self, file: str, probs: np.ndarray) -> Prediction:
        names = self.spec.class_names
        if len(probs) != len(names):
            raise DataError(f"{self.model}: {len(probs)} outputs but {len(names)} class names")
        return Prediction(
            file=file,
            label=names[int(np.argmax(probs))],
            probabilities={n: float(v) for n, v in zip(names, probs, strict=True)},
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
