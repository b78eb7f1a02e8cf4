"""serving/triton_backend/preprocess.py in process (Triton's pb_utils stood in for): the
bytes the server decodes give exactly the tensor training and the client compute, and
every bad item is answered with INVALID_ARG naming the problem. The real server runs it
through the ensemble in tests/integration/test_ensemble.py::

    python -m pytest tests/integration/test_triton_backend_preprocess.py -q
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format

from serving.repository.layout import read_config
from tests.fixtures.requests import dicom_without_pixels, encoded
from tests.fixtures.triton import FakeTritonError, fake_pb_utils
from training.images import read_image_bytes

PREPROCESS = Path(__file__).resolve().parents[2] / "serving" / "triton_backend" / "preprocess.py"
SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "samples"


@pytest.fixture()
def preprocess(tiny_classifier_repository, tiny_classifier_spec, monkeypatch):
    pb = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("medimg_preprocess_model", PREPROCESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_dir = tiny_classifier_repository / f"{tiny_classifier_spec.model_name}_preprocess"
    config = json_format.MessageToJson(read_config(model_dir), preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize(
        {"model_config": config, "model_repository": str(model_dir), "model_version": "1"}
    )
    yield model, pb
    model.finalize()


def request(pb, items: list[bytes]):
    return {"image": pb.Tensor("image", np.array([[b] for b in items], dtype=np.object_))}


def test_png_jpeg_dicom_give_the_training_tensor(preprocess, tiny_classifier_spec):
    model, pb = preprocess
    items = [encoded("png"), encoded("jpeg"), encoded("dicom")]
    (response,) = model.execute([request(pb, items)])
    assert response.error is None
    (tensor,) = response.output_tensors
    assert tensor.name == "input"
    got = tensor.as_numpy()
    assert got.shape == (3, 1, 32, 32) and got.dtype == np.float32
    for row, data in enumerate(items):
        expected = tiny_classifier_spec.preprocess(read_image_bytes(data)[None])[0]
        np.testing.assert_array_equal(got[row], expected)


def test_each_bad_request_gets_its_own_invalid_arg(preprocess):
    model, pb = preprocess
    good = encoded("png")
    requests = [
        request(pb, [good]),
        request(pb, [b"\x89PNG not really an image"]),
        request(pb, [good[: len(good) // 2]]),  # truncated PNG
        request(pb, [b""]),
        request(pb, [dicom_without_pixels()]),
        {"image": pb.Tensor("image", np.zeros((1, 1), np.float32))},  # wrong dtype
        {"image": pb.Tensor("image", np.array([[good, good]], dtype=np.object_))},  # wrong shape
        {"image": pb.Tensor("image", np.zeros((0, 1), dtype=np.object_))},  # empty batch
        {},  # no input at all
        request(pb, [good]),
    ]
    responses = model.execute(requests)
    assert responses[0].error is None and responses[-1].error is None
    errors = [r.error for r in responses[1:-1]]
    assert all(isinstance(e, FakeTritonError) for e in errors), errors
    assert all(e.code == FakeTritonError.INVALID_ARG for e in errors)
    messages = [str(e) for e in errors]
    assert "image[0]" in messages[0]
    assert "image[0]" in messages[1]
    assert "empty" in messages[2]
    assert "pixel" in messages[3].lower()
    assert "BYTES" in messages[4] and "float32" in messages[4]
    assert "expected shape [n, 1]" in messages[5] and "[1, 2]" in messages[5]
    assert "[0, 1]" in messages[6]
    assert "missing input 'image'" in messages[7]
