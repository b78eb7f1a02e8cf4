"""Triton Python-backend model: encoded image bytes in, the classifier's input tensor out.

:func:`serving.repository.layout.write_model_set` copies this file into
``<repository>/NAME_preprocess/<version>/model.py``. It decodes PNG, JPEG, DICOM
(MONOCHROME1, rescale and windowing applied) and ``.npy`` bytes with
``training.images.read_image_bytes`` and resizes and normalises them with
``ModelSpec.preprocess``: the very code training and the Python client use, imported
from the installed ``medimg`` package, so the server cannot drift from training. The
spec comes from the config's ``medimg_spec`` parameter; both are read once, in
:meth:`TritonPythonModel.initialize`. Try it through the ensemble::

    curl -s localhost:8000/v2/models/pneumoniamnist-densenet121/config | python -m json.tool

Every bad item (bytes that are no image, a DICOM without pixel data, an empty string,
an item above the config's ``max_image_bytes``, a ``.npy`` header declaring more data
than the item holds, a wrong dtype or shape) answers its request with ``INVALID_ARG``
naming the problem; the other requests in the same batch are served. No exception
leaves :meth:`TritonPythonModel.execute` (Triton would answer it with 500).
"""

from __future__ import annotations

import io
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from training.errors import MedimgError
from training.images import read_image_bytes
from training.spec import ModelSpec

IMAGE_INPUT = "image"
DEFAULT_MAX_IMAGE_BYTES = 32 << 20  # repositories written before the parameter existed


def _error(message: str):
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


def _check_npy_size(data: bytes, row: int) -> None:
    """A ``.npy`` item's header must not declare more data than the item holds (numpy would
    allocate the declared array before finding the data missing)."""
    if data[:6] != b"\x93NUMPY":
        return
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        # the one reader of every .npy version (1.0, 2.0 and 3.0); numpy keeps it private
        shape, _, dtype = np.lib.format._read_array_header(stream, version)  # type: ignore[attr-defined]
    except Exception as exc:
        raise ValueError(f"input {IMAGE_INPUT!r} item {row}: bad .npy header ({exc})") from None
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > len(data) - stream.tell():
        raise ValueError(
            f"input {IMAGE_INPUT!r} item {row}: .npy header declares {declared} bytes of "
            f"data {list(shape)} {dtype}, the item holds {len(data) - stream.tell()}"
        )


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = config.get("name", "?")
        raw = config.get("parameters", {}).get("medimg_spec", {}).get("string_value")
        if not raw:
            raise pb_utils.TritonModelException(
                f"model {self.model_name}: config has no 'medimg_spec' parameter"
            )
        self.spec = ModelSpec.from_json(raw)
        self.max_batch_size = int(config.get("max_batch_size", 0))
        limit = config.get("parameters", {}).get("max_image_bytes", {}).get("string_value")
        self.max_image_bytes = int(limit or DEFAULT_MAX_IMAGE_BYTES)

    def _decode(self, array: np.ndarray) -> np.ndarray:
        """One request's (n, 1) object array of bytes -> float32 (n, C, S, S)."""
        if array.dtype != np.object_:
            raise ValueError(f"input {IMAGE_INPUT!r}: expected BYTES, got {array.dtype}")
        if array.ndim != 2 or array.shape[1] != 1 or array.shape[0] < 1:
            raise ValueError(
                f"input {IMAGE_INPUT!r}: expected shape [n, 1] with 1 <= n <= "
                f"{self.max_batch_size} (one encoded image per row), got {list(array.shape)}"
            )
        tensors = []
        for row, item in enumerate(array[:, 0]):
            data = bytes(item) if not isinstance(item, bytes) else item
            if not data:
                raise ValueError(f"input {IMAGE_INPUT!r} item {row}: empty (0 bytes)")
            if len(data) > self.max_image_bytes:
                raise ValueError(
                    f"input {IMAGE_INPUT!r} item {row}: {len(data)} bytes, above the limit of "
                    f"{self.max_image_bytes} bytes (max_image_bytes)"
                )
            _check_npy_size(data, row)
            image = read_image_bytes(data, name=f"{IMAGE_INPUT}[{row}]")
            tensors.append(self.spec.preprocess(image[None]))
        return np.ascontiguousarray(np.concatenate(tensors), dtype=np.float32)

    def _respond(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT)
        if tensor is None:
            return _error(f"model {self.model_name}: missing input {IMAGE_INPUT!r}")
        try:
            batch = self._decode(tensor.as_numpy())
        except (MedimgError, ValueError) as exc:
            return _error(f"model {self.model_name}: {exc}")
        except Exception as exc:  # any decoder failure (MemoryError too) is the input's fault
            return _error(
                f"model {self.model_name}: cannot decode {IMAGE_INPUT!r}: "
                f"{type(exc).__name__}: {exc}"
            )
        out = pb_utils.Tensor(self.spec.input_name, batch)
        return pb_utils.InferenceResponse(output_tensors=[out])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._respond(request))
            except Exception as exc:  # never let one escape: Triton would answer 500 for all
                responses.append(
                    _error(
                        f"model {self.model_name}: cannot preprocess {IMAGE_INPUT!r}: "
                        f"{type(exc).__name__}: {exc}"
                    )
                )
        return responses

    def finalize(self):
        self.spec = None
