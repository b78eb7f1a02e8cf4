"""serving/triton_backend/model.py, the classifier's Python-backend model, in process over a
stand-in for Triton's pb_utils (the real server runs it in tests/integration/)::

    python -m pytest tests/unit/test_triton_backend_model.py -q
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format

from serving.repository.layout import read_config
from serving.repository.model_config import RepositoryOptions, classifier_config
from tests.fixtures.triton import FakeTritonError, fake_pb_utils

BACKEND_MODEL = Path(__file__).resolve().parents[2] / "serving" / "triton_backend" / "model.py"
MODEL = "pneumoniamnist-densenet121"
CLASSIFIER = f"{MODEL}_onnx"


def _backend_module(monkeypatch, name: str):
    """serving/triton_backend/model.py imported as ``name`` over a fresh pb_utils stand-in:
    (module, stand-in)."""
    pb = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    module_spec = importlib.util.spec_from_file_location(name, BACKEND_MODEL)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, pb


@pytest.fixture()
def backend_model(tiny_classifier_repository, monkeypatch):
    module, pb = _backend_module(monkeypatch, "medimg_backend_model")
    model_dir = tiny_classifier_repository / CLASSIFIER
    proto = read_config(model_dir)
    # one session; borrowing is tested in tests/integration/test_server_borrow_cores.py
    proto.parameters["borrow_idle_cores"].string_value = "0"
    config = json_format.MessageToJson(proto, preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize(
        {"model_config": config, "model_repository": str(model_dir), "model_version": "1"}
    )
    runs = []
    session = model.session

    class CountingSession:  # records every ORT run, delegates to the real session
        def run(self, names, feeds):
            runs.append(feeds[model.input_name].shape)
            return session.run(names, feeds)

    model.session = CountingSession()
    yield model, pb, runs
    model.finalize()


@pytest.mark.parametrize("threads", [1, 2])
def test_backend_sessions_of_several_threads_stop_spinning_after_a_run(
    tiny_classifier_repository, monkeypatch, threads
):
    """One instance: its session's threads sleep between runs when it has more than one
    (a spinning idle thread takes a core from the server's own threads), and the log says so."""
    module, pb = _backend_module(monkeypatch, "medimg_backend_model3")
    model_dir = tiny_classifier_repository / CLASSIFIER
    proto = read_config(model_dir)
    proto.instance_group[0].count = 1
    proto.parameters["intra_op_threads"].string_value = str(threads)
    config = json_format.MessageToJson(proto, preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize(
        {"model_config": config, "model_repository": str(model_dir), "model_version": "1"}
    )
    options = model.session.get_session_options()
    assert options.intra_op_num_threads == threads and model.wide is None
    try:
        stops = options.get_session_config_entry("session.force_spinning_stop")
    except RuntimeError:  # ONNX Runtime's answer for a key never set
        stops = None
    assert stops == ("1" if threads > 1 else None)
    said = f"model {CLASSIFIER}: ONNX Runtime on {threads} thread(s)"
    said += "; threads stop spinning after each run" if threads > 1 else ""
    assert pb.logged == [("info", said)]
    model.finalize()


def test_backend_batches_valid_requests_into_one_run(backend_model, tiny_classifier_onnx):
    model, pb, runs = backend_model
    rng = np.random.default_rng(0)
    good = [rng.random((n, 1, 32, 32), dtype=np.float32) for n in (2, 1, 3)]
    bad_shape = rng.random((1, 1, 16, 16), dtype=np.float32)
    bad_dtype = rng.random((1, 1, 32, 32))  # float64
    too_big = np.zeros((33, 1, 32, 32), np.float32)
    arrays = [good[0], bad_shape, good[1], bad_dtype, too_big, good[2]]
    requests = [{"input": pb.Tensor("input", a)} for a in arrays] + [{}]
    responses = model.execute(requests)

    assert runs == [(6, 1, 32, 32)]  # one ORT run for the three valid requests
    reference = ort.InferenceSession(str(tiny_classifier_onnx), providers=["CPUExecutionProvider"])
    for index, array in ((0, good[0]), (2, good[1]), (5, good[2])):
        response = responses[index]
        assert response.error is None
        (tensor,) = response.output_tensors
        assert tensor.name == "probabilities"
        expected = reference.run(None, {"input": array})[0]
        np.testing.assert_allclose(tensor.as_numpy(), expected, atol=1e-6)
    errors = {i: responses[i].error for i in (1, 3, 4, 6)}
    assert all(e is not None and e.code == FakeTritonError.INVALID_ARG for e in errors.values())
    assert "expected shape [n, 1, 32, 32]" in str(errors[1]) and "[1, 1, 16, 16]" in str(errors[1])
    assert "float32" in str(errors[3]) and "float64" in str(errors[3])
    assert "batch of 33" in str(errors[4])
    assert "missing input 'input'" in str(errors[6])


def test_backend_turns_runtime_failures_into_error_responses(backend_model):
    model, pb, _ = backend_model

    class Broken:
        def run(self, names, feeds):
            raise RuntimeError("out of cheese")

    model.session = Broken()
    array = np.zeros((2, 1, 32, 32), np.float32)
    responses = model.execute([{"input": pb.Tensor("input", array)}] * 2)
    assert [r.error.code for r in responses] == [FakeTritonError.INTERNAL] * 2
    assert "out of cheese" in str(responses[0].error)


def test_backend_refuses_an_onnx_file_with_other_names(tmp_path, tiny_classifier_onnx, monkeypatch):
    module, _ = _backend_module(monkeypatch, "medimg_backend_model2")
    from training.spec import ModelSpec

    spec = ModelSpec("x", "binary-class", ("a", "b"), 32, 1, input_name="pixels")
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(tiny_classifier_onnx.read_bytes())
    config = json_format.MessageToJson(
        classifier_config(spec, RepositoryOptions()), preserving_proto_field_name=True
    )
    args = {"model_config": config, "model_repository": str(tmp_path), "model_version": "1"}
    with pytest.raises(RuntimeError, match="pixels"):
        module.TritonPythonModel().initialize(args)
    assert json.loads(config)["max_batch_size"] == 32
