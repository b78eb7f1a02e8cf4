"""serving.repository: the Triton model repository, and the Python-backend model.py it ships.

python -m pytest tests/test_repository.py -q
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from serving.repository import (
    build_config,
    list_models,
    read_config,
    spec_from_config,
    write_classifier,
)
from training.errors import ConfigError

pytestmark = pytest.mark.timeout(300)

BACKEND_MODEL = Path(__file__).resolve().parents[1] / "serving" / "triton_backend" / "model.py"
MODEL = "pneumoniamnist-densenet121"


def test_config_parses_back_to_the_intended_values(
    tiny_classifier_repository, tiny_classifier_spec
):
    path = tiny_classifier_repository / MODEL / "config.pbtxt"
    from google.protobuf import text_format

    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    assert config.name == MODEL
    assert config.backend == "python"
    assert config.platform == ""
    assert config.max_batch_size == 32
    assert len(config.input) == 1 and len(config.output) == 1
    (inp,), (out,) = config.input, config.output
    assert (inp.name, inp.data_type, list(inp.dims)) == (
        "input",
        model_config_pb2.TYPE_FP32,
        [1, 32, 32],
    )
    assert (out.name, out.data_type, list(out.dims)) == (
        "probabilities",
        model_config_pb2.TYPE_FP32,
        [2],
    )
    assert out.label_filename == "labels.txt"
    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)
    ]
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["onnx_file"] == "model.onnx"
    assert params["intra_op_threads"] == "0"
    assert spec_from_config(config) == tiny_classifier_spec
    assert read_config(path.parent) == config  # the public reader agrees


def test_files_in_the_model_dir(tiny_classifier_repository, tiny_classifier_onnx):
    model_dir = tiny_classifier_repository / MODEL
    assert (model_dir / "labels.txt").read_text().splitlines() == ["normal", "pneumonia"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == tiny_classifier_onnx.read_bytes()
    assert (model_dir / "1" / "model.py").read_bytes() == BACKEND_MODEL.read_bytes()
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    assert list_models(tiny_classifier_repository) == [MODEL]


def test_options_reach_the_config(tmp_path, tiny_classifier_spec, tiny_classifier_onnx):
    model_dir = write_classifier(
        tmp_path,
        tiny_classifier_spec,
        tiny_classifier_onnx,
        version=3,
        max_batch_size=12,
        preferred_batch_sizes=(16, 4, 8, 8),
        max_queue_delay_us=100,
        instance_count=2,
        intra_op_threads=1,
    )
    config = read_config(model_dir)
    assert config.max_batch_size == 12
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]  # only sizes <= 12
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.instance_group[0].count == 2
    assert config.parameters["intra_op_threads"].string_value == "1"
    assert (model_dir / "3" / "model.onnx").is_file()


@pytest.mark.parametrize(
    "option",
    [
        {"max_batch_size": 0},
        {"max_batch_size": -1},
        {"instance_count": 0},
        {"intra_op_threads": -1},
        {"version": 0},
        {"preferred_batch_sizes": (0, 8)},
    ],
)
def test_bad_options_raise_config_error_and_write_nothing(
    tmp_path, tiny_classifier_spec, tiny_classifier_onnx, option
):
    name = next(iter(option))
    with pytest.raises(ConfigError, match=name.split("_")[0]):
        write_classifier(tmp_path, tiny_classifier_spec, tiny_classifier_onnx, **option)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_file_is_named(tmp_path, tiny_classifier_spec):
    with pytest.raises(ConfigError, match=r"nope\.onnx"):
        write_classifier(tmp_path / "repo", tiny_classifier_spec, tmp_path / "nope.onnx")


def test_rewriting_a_version_replaces_it(tmp_path, tiny_classifier_spec, tiny_classifier_onnx):
    model_dir = write_classifier(tmp_path, tiny_classifier_spec, tiny_classifier_onnx)
    (model_dir / "1" / "stale.txt").write_text("from the old version")
    other = tmp_path / "other.onnx"
    other.write_bytes(b"not the same model")
    assert write_classifier(tmp_path, tiny_classifier_spec, other) == model_dir
    assert (model_dir / "1" / "model.onnx").read_bytes() == b"not the same model"
    assert not (model_dir / "1" / "stale.txt").exists()
    write_classifier(tmp_path, tiny_classifier_spec, tiny_classifier_onnx, version=2)
    # no staging leftovers; both versions present
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.pbtxt", "labels.txt"]
    assert (model_dir / "2" / "model.onnx").read_bytes() == tiny_classifier_onnx.read_bytes()


def test_list_models_needs_a_config(tmp_path, tiny_classifier_spec, tiny_classifier_onnx):
    assert list_models(tmp_path) == []
    (tmp_path / "half-written" / "1").mkdir(parents=True)
    assert list_models(tmp_path) == []
    write_classifier(tmp_path, tiny_classifier_spec, tiny_classifier_onnx)
    assert list_models(tmp_path) == [MODEL]
    with pytest.raises(ConfigError, match="missing"):
        list_models(tmp_path / "missing")


def test_read_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.pbtxt"):
        read_config(tmp_path)
    bad = tmp_path / "config.pbtxt"
    bad.write_text("name: 'x'\nmax_batch_size: [")
    with pytest.raises(ConfigError, match="malformed"):
        read_config(bad)
    with pytest.raises(ConfigError, match="medimg_spec"):
        spec_from_config(model_config_pb2.ModelConfig(name="x"))


# -- the Python-backend model.py, in process, with a stand-in for Triton's pb_utils ---------------


class _TritonError(Exception):
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message, code=INTERNAL):
        super().__init__(message)
        self.code = code


def _fake_pb_utils() -> types.ModuleType:
    """The parts of ``triton_python_backend_utils`` that model.py uses."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self.error = list(output_tensors), error

    def get_input_tensor_by_name(request, name):
        return request.get(name)

    pb.Tensor, pb.InferenceResponse, pb.TritonError = Tensor, InferenceResponse, _TritonError
    pb.TritonModelException = RuntimeError
    pb.get_input_tensor_by_name = get_input_tensor_by_name
    return pb


@pytest.fixture()
def backend_model(tiny_classifier_repository, monkeypatch):
    pb = _fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    module_spec = importlib.util.spec_from_file_location("medimg_backend_model", BACKEND_MODEL)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    model_dir = tiny_classifier_repository / MODEL
    config = json_format.MessageToJson(read_config(model_dir), preserving_proto_field_name=True)
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
    assert all(e is not None and e.code == _TritonError.INVALID_ARG for e in errors.values())
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
    assert [r.error.code for r in responses] == [_TritonError.INTERNAL] * 2
    assert "out of cheese" in str(responses[0].error)


def test_backend_refuses_an_onnx_file_with_other_names(tmp_path, tiny_classifier_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    module_spec = importlib.util.spec_from_file_location("medimg_backend_model2", BACKEND_MODEL)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    from training.spec import ModelSpec

    spec = ModelSpec("x", "binary-class", ("a", "b"), 32, 1, input_name="pixels")
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(tiny_classifier_onnx.read_bytes())
    config = json_format.MessageToJson(build_config(spec), preserving_proto_field_name=True)
    args = {"model_config": config, "model_repository": str(tmp_path), "model_version": "1"}
    with pytest.raises(RuntimeError, match="pixels"):
        module.TritonPythonModel().initialize(args)
    assert json.loads(config)["max_batch_size"] == 32
