"""The synchronous Python client for medimg models on Triton, over HTTP or gRPC
(``tritonclient``).

:class:`TritonClassifier` connects on construction: it reads the model's
:class:`~serving.clients.contract.ModelContract` (input and output names, image size,
channels, normalisation, class names, max batch size) from the server's model config,
exposed as ``client.contract``. Connecting and the item-by-item retry of a refused batch
are the same code as the asyncio client's (:mod:`serving.clients.session`), requests are
built by :mod:`serving.clients.contract`. ``model`` is the ensemble medimg exports: by
default each item's encoded bytes (PNG, JPEG, DICOM, ``.npy``) go to it and the server
decodes and preprocesses them; with ``client_preprocess=True`` the client does that and
sends float tensors to the ensemble's classifier ``NAME_onnx``::

    python -c "from serving.clients.sync import TritonClassifier as C; \
c = C('127.0.0.1:8001', 'grpc'); print(next(c.classify_files(['../shared/data/samples/00000001_000.png'])))"
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serving.clients.contract import Prediction, bytes_batch, chunks, prepare_batch
from serving.clients.inputs import Item, file_items
from serving.clients.session import Call, ClientBase, classify_steps, drive
from serving.repository.model_config import IMAGE_INPUT
from training.spec import ModelSpec


class TritonClassifier(ClientBase):
    """A synchronous connection to one medimg classifier on a Triton server."""

    def _start(self) -> None:
        """Connect at once: check the server is live and read the model's contract."""
        self._open()
        try:  # a failed connect closes its connection
            self._connected(drive(self._connect_steps(), self.perform))
        except BaseException:
            self.close()
            raise

    # the contract, under the names callers used before it existed
    @property
    def model(self) -> str:
        return self.contract.model

    @property
    def spec(self) -> ModelSpec:
        return self.contract.spec

    @property
    def tensor_model(self) -> str:
        return self.contract.tensor_model

    @property
    def max_batch_size(self) -> int:
        return self.contract.max_batch_size

    def perform(self, call: Call) -> Any:
        """One tritonclient call; a failure is a :class:`ServingError` naming the server."""
        try:
            answer = call.start(self._client)
        except Exception as exc:
            raise self._failed(call, exc) from exc
        return call.then(answer)

    def _run(self, model: str, name: str, array: np.ndarray) -> np.ndarray:
        return self.perform(self._infer_call(model, name, array, self.spec.output_name))

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

    def send(self, array: np.ndarray) -> np.ndarray:
        """One request: BYTES [n, 1] to the ensemble, FP32 (n, C, S, S) to the classifier."""
        return self._run(*self.contract.target(array), array)

    def infer_outputs(self, array: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One request asking for ``outputs`` (e.g. ``("probabilities", "cam")``): BYTES
        [n, 1] to the ensemble, FP32 (n, C, S, S) to the classifier; ``{name: array}``."""
        return self.perform(self._outputs_call(array, outputs))

    def classify_items(self, items: Sequence[Item], batch_size: int = 0) -> Iterator[Prediction]:
        """One :class:`Prediction` per item, in order; a bad item carries an error. Items go
        ``batch_size`` (default: the model's max) per request; a batch the server refuses
        (one file it cannot decode) is retried item by item."""
        for batch in chunks(list(items), self._batch_size(batch_size)):
            prepared = prepare_batch(batch, self.contract, self.client_preprocess)
            yield from drive(classify_steps(batch, prepared, self.contract), self.send)

    def classify_files(self, files: Sequence[str | Path]) -> Iterator[Prediction]:
        """One :class:`Prediction` per file, in order; bad files carry an error."""
        return self.classify_items(file_items(files))

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.close()

    def __enter__(self) -> TritonClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
