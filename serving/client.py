"""Classify images through a running Triton server, over HTTP or gRPC (``tritonclient``).

The client learns the model's preprocessing contract (image size, channels,
class names) from the server's model config, reads PNG/JPEG/``.npy`` files,
preprocesses them exactly as in training, and sends batches::

    medimg classify ../shared/data/samples/00000001_000.png --protocol grpc --json
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.repository import SPEC_PARAMETER
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
        self, url: str = "", protocol: str = "http", model: str = "", timeout_s: float = 60.0
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
        self.config = self._model_config()
        self.spec = self._spec_from_config()
        self.max_batch_size = max(1, int(self.config.get("max_batch_size", 1)))

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise ServingError(f"{self.url} ({self.protocol}): {what} failed: {exc}") from exc

    def _only_model(self) -> str:
        index = self._call("repository index", self._client.get_model_repository_index)
        if self.protocol == "grpc":
            index = [{"name": m.name, "state": m.state} for m in index.models]
        ready = sorted({m["name"] for m in index if m.get("state") == "READY"})
        if len(ready) != 1:
            raise ServingError(
                f"{self.url}: pass --model; models ready on this server: {ready or 'none'}"
            )
        return ready[0]

    def _model_config(self) -> dict:
        if self.protocol == "grpc":
            config = self._call(
                f"model config of {self.model!r}",
                self._client.get_model_config,
                self.model,
                as_json=True,
            )["config"]
        else:
            config = self._call(
                f"model config of {self.model!r}", self._client.get_model_config, self.model
            )
        return config

    def _spec_from_config(self) -> ModelSpec:
        params = self.config.get("parameters", {})
        raw = params.get(SPEC_PARAMETER, {}).get("string_value") or params.get(
            SPEC_PARAMETER, {}
        ).get("stringValue")
        if not raw:
            raise ServingError(
                f"{self.url}: model {self.model!r} has no {SPEC_PARAMETER!r} parameter; "
                "it was not exported by medimg"
            )
        return ModelSpec.from_json(raw)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for preprocessed float32 (N, C, S, S), sent in max_batch_size chunks."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = []
        for start in range(0, len(x), self.max_batch_size):
            chunk = x[start : start + self.max_batch_size]
            inp = self._mod.InferInput(self.spec.input_name, list(chunk.shape), "FP32")
            if self.protocol == "http":
                inp.set_data_from_numpy(chunk, binary_data=True)
                outputs = [self._mod.InferRequestedOutput(self.spec.output_name, binary_data=True)]
            else:
                inp.set_data_from_numpy(chunk)
                outputs = [self._mod.InferRequestedOutput(self.spec.output_name)]
            result = self._call(
                f"inference on {self.model!r}",
                self._client.infer,
                self.model,
                [inp],
                outputs=outputs,
            )
            out.append(result.as_numpy(self.spec.output_name))
        return np.concatenate(out)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return self.spec.preprocess(image[None])

    def classify_files(self, files: Sequence[str | Path]) -> Iterator[Prediction]:
        """One :class:`Prediction` per file, in order; bad files carry an error, not an exception."""
        for batch in _chunks(list(files), self.max_batch_size):
            tensors, ok = [], []
            results: dict[int, Prediction] = {}
            for i, path in enumerate(batch):
                try:
                    tensors.append(self.preprocess(read_image(path)))
                    ok.append(i)
                except MedimgError as exc:
                    results[i] = Prediction(file=str(path), error=str(exc))
            if tensors:
                probs = self.infer(np.concatenate(tensors))
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
