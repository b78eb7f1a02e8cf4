"""Triton Python-backend model: encoded image bytes in, the classifier's input tensor out.

:func:`serving.repository.write_model_set` copies this file into
``<repository>/NAME_preprocess/<version>/model.py``. It decodes PNG, JPEG, DICOM
(MONOCHROME1, rescale and windowing applied) and ``.npy`` bytes with
``training.images.read_image_bytes`` and resizes and normalises them with
``ModelSpec.preprocess``: the very code training and the Python client use, imported
from the installed ``medimg`` package, so the server cannot drift from training. The
spec comes from the config's ``medimg_spec`` parameter; both are read once, in
:meth:`TritonPythonModel.initialize`. Try it through the ensemble::

    curl -s localhost:8000/v2/models/pneumoniamnist-densenet121/config | python -m json.tool

Every bad item (bytes that are no image, a DICOM without pixel data, an empty string,
a wrong dtype or shape) answers its request with ``INVALID_ARG`` naming the problem;
the other requests in the same batch are served.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from training.errors import MedimgError
from training.images import read_image_bytes
from training.spec import ModelSpec

IMAGE_INPUT = "image"


def _error(message: str):
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
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
            image = read_image_bytes(data, name=f"{IMAGE_INPUT}[{row}]")
            tensors.append(self.spec.preprocess(image[None]))
        return np.ascontiguousarray(np.concatenate(tensors), dtype=np.float32)

    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT)
            if tensor is None:
                responses.append(_error(f"model {self.model_name}: missing input {IMAGE_INPUT!r}"))
                continue
            try:
                batch = self._decode(tensor.as_numpy())
            except (MedimgError, ValueError) as exc:
                responses.append(_error(f"model {self.model_name}: {exc}"))
                continue
            except Exception as exc:  # any decoder failure is the input's fault
                responses.append(
                    _error(
                        f"model {self.model_name}: cannot decode {IMAGE_INPUT!r}: "
                        f"{type(exc).__name__}: {exc}"
                    )
                )
                continue
            out = pb_utils.Tensor(self.spec.input_name, batch)
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self):
        self.spec = None
