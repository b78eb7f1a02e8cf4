"""serving.repository: the Triton model configs (parsed back through Triton's own protobuf
schema) and the versioned repository writes; the backend's model.py has
tests/unit/test_triton_backend_model.py::

    python -m pytest tests/unit/test_repository.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from serving.repository.layout import (
    list_models,
    next_version,
    read_config,
    spec_from_config,
    write_model_set,
)
from serving.repository.model_config import (
    RepositoryOptions,
    classifier_config,
    engine_config,
    parse_version_policy,
)
from training.errors import ConfigError

pytestmark = pytest.mark.timeout(300)

BACKEND_DIR = Path(__file__).resolve().parents[2] / "serving" / "triton_backend"
BACKEND_MODEL = BACKEND_DIR / "model.py"
PREPROCESS_MODEL = BACKEND_DIR / "preprocess.py"
MODEL = "pneumoniamnist-densenet121"
CLASSIFIER, PREPROCESS = f"{MODEL}_onnx", f"{MODEL}_preprocess"
KIND_CPU, KIND_GPU = (
    model_config_pb2.ModelInstanceGroup.KIND_CPU,
    model_config_pb2.ModelInstanceGroup.KIND_GPU,
)


def test_classifier_config_parses_back_to_the_intended_values(
    tiny_classifier_repository, tiny_classifier_spec
):
    path = tiny_classifier_repository / CLASSIFIER / "config.pbtxt"
    from google.protobuf import text_format

    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    assert config.name == CLASSIFIER
    assert (config.backend, config.platform) == ("python", "")
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
    assert config.HasField("dynamic_batching")  # on, with the measured defaults:
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.kind, g.count) for g in config.instance_group] == [(KIND_CPU, 2)]
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["onnx_file"] == "model.onnx"
    assert params["intra_op_threads"] == "0"
    (warmup,) = config.model_warmup
    assert warmup.batch_size == 1
    assert warmup.inputs["input"].zero_data
    assert list(warmup.inputs["input"].dims) == [1, 32, 32]
    assert spec_from_config(config) == tiny_classifier_spec
    assert read_config(path.parent) == config  # the public reader agrees


def test_gpu_target_configs(tiny_classifier_spec):
    opts = RepositoryOptions(
        target="gpu", instance_count=2, trt_precision="FP16", intra_op_threads=2
    )
    config = read_back(classifier_config(tiny_classifier_spec, opts))
    assert (config.platform, config.backend) == ("onnxruntime_onnx", "")
    assert [(g.kind, g.count) for g in config.instance_group] == [(KIND_GPU, 2)]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"
    assert "onnx_file" not in config.parameters  # the Python-backend parameters are cpu only
    assert config.parameters["intra_op_thread_count"].string_value == "2"  # onnxruntime backend
    assert config.model_warmup[0].inputs["input"].zero_data  # the engine builds at warmup
    engine = read_back(engine_config(tiny_classifier_spec, opts))
    assert (engine.name, engine.platform) == (f"{MODEL}_trt", "tensorrt_plan")
    assert engine.default_model_filename == "model.plan"
    assert [(i.name, list(i.dims)) for i in engine.input] == [("input", [1, 32, 32])]
    assert [(g.kind, g.count) for g in engine.instance_group] == [(KIND_GPU, 2)]


def read_back(config: model_config_pb2.ModelConfig) -> model_config_pb2.ModelConfig:
    """Through the text format and back, as Triton reads it."""
    from google.protobuf import text_format

    return text_format.Parse(text_format.MessageToString(config), model_config_pb2.ModelConfig())


def test_preprocess_config_and_its_warmup_sample(tiny_classifier_repository, tiny_classifier_spec):
    import io
    import struct

    from PIL import Image

    model_dir = tiny_classifier_repository / PREPROCESS
    config = read_config(model_dir)
    assert (config.name, config.backend) == (PREPROCESS, "python")
    (inp,), (out,) = config.input, config.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("image", model_config_pb2.TYPE_STRING, [1])
    assert (out.name, out.data_type, list(out.dims)) == (
        "input",
        model_config_pb2.TYPE_FP32,
        [1, 32, 32],
    )
    assert config.HasField("dynamic_batching")
    (warmup,) = config.model_warmup
    sample = warmup.inputs["image"]
    assert sample.data_type == model_config_pb2.TYPE_STRING
    data = (model_dir / "warmup" / sample.input_data_file).read_bytes()
    (length,) = struct.unpack("<I", data[:4])  # Triton's serialized BYTES element
    assert length == len(data) - 4
    assert Image.open(io.BytesIO(data[4:])).size == (32, 32)
    assert spec_from_config(config) == tiny_classifier_spec
    assert (model_dir / "1" / "model.py").read_bytes() == PREPROCESS_MODEL.read_bytes()


def test_ensemble_wires_preprocess_into_the_classifier(tiny_classifier_repository):
    config = read_config(tiny_classifier_repository / MODEL)
    assert config.platform == "ensemble"
    assert [s.model_name for s in config.ensemble_scheduling.step] == [PREPROCESS, CLASSIFIER]
    assert [(i.name, i.data_type) for i in config.input] == [
        ("image", model_config_pb2.TYPE_STRING)
    ]
    (out,) = config.output
    assert (out.name, out.label_filename) == ("probabilities", "labels.txt")
    # every step input comes from the ensemble's input or an earlier step's output, and the
    # ensemble's output is produced by a step
    available = {i.name for i in config.input}
    for step in config.ensemble_scheduling.step:
        step_config = read_config(tiny_classifier_repository / step.model_name)
        assert set(step.input_map) == {i.name for i in step_config.input}
        assert set(step.output_map) <= {o.name for o in step_config.output}
        assert set(step.input_map.values()) <= available
        available |= set(step.output_map.values())
    assert out.name in available
    assert config.parameters["medimg_classifier"].string_value == CLASSIFIER
    assert config.version_policy.latest.num_versions == 1  # whatever the models' policy


def test_files_in_the_model_dirs(tiny_classifier_repository, tiny_classifier_onnx):
    repo = tiny_classifier_repository
    assert (repo / CLASSIFIER / "labels.txt").read_text().splitlines() == ["normal", "pneumonia"]
    assert (repo / MODEL / "labels.txt").read_text().splitlines() == ["normal", "pneumonia"]
    assert (
        repo / CLASSIFIER / "1" / "model.onnx"
    ).read_bytes() == tiny_classifier_onnx.read_bytes()
    assert (repo / CLASSIFIER / "1" / "model.py").read_bytes() == BACKEND_MODEL.read_bytes()
    assert sorted(p.name for p in (repo / CLASSIFIER).iterdir()) == [
        "1",
        "config.pbtxt",
        "labels.txt",
    ]
    assert sorted(p.name for p in (repo / MODEL).iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    assert list_models(repo) == [MODEL, CLASSIFIER, PREPROCESS]


def test_options_reach_the_configs(tmp_path, tiny_classifier_spec, tiny_classifier_onnx):
    opts = RepositoryOptions(
        max_batch_size=12,
        preferred_batch_sizes=(16, 4, 8, 8),
        max_queue_delay_us=100,
        instance_count=2,
        preprocess_instance_count=3,
        intra_op_threads=1,
        version_policy="latest:2",
        warmup=False,
    )
    models = write_model_set(tmp_path, tiny_classifier_spec, tiny_classifier_onnx, opts, version=3)
    assert models.version == 3
    config = read_config(models.classifier)
    assert config.max_batch_size == 12
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]  # only sizes <= 12
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.instance_group[0].count == 2
    assert config.parameters["intra_op_threads"].string_value == "1"
    assert config.version_policy.latest.num_versions == 2
    assert not config.model_warmup
    pre = read_config(models.preprocess)
    assert pre.instance_group[0].count == 3 and not pre.model_warmup
    # the batcher's delay and sizes are the classifier's: preprocess takes what is queued
    assert pre.HasField("dynamic_batching")
    assert not pre.dynamic_batching.preferred_batch_size
    assert pre.dynamic_batching.max_queue_delay_microseconds == 0
    assert (models.classifier / "3" / "model.onnx").is_file()
    assert (models.preprocess / "3" / "model.py").is_file()


@pytest.mark.parametrize(
    ("text", "choice", "value"),
    [("latest:3", "latest", [3]), ("all", "all", []), ("specific:1,3", "specific", [1, 3])],
)
def test_version_policies(text, choice, value):
    policy = parse_version_policy(text)
    assert policy.WhichOneof("policy_choice") == choice
    if choice == "latest":
        assert [policy.latest.num_versions] == value
    if choice == "specific":
        assert list(policy.specific.versions) == value


@pytest.mark.parametrize(
    "option",
    [
        {"max_batch_size": 0},
        {"max_batch_size": -1},
        {"instance_count": 0},
        {"intra_op_threads": -1},
        {"preferred_batch_sizes": (0, 8)},
        {"version_policy": "latest:0"},
        {"version_policy": "newest"},
        {"version_policy": "specific:1,x"},
        {"target": "tpu"},
        {"trt_precision": "INT4"},
    ],
)
def test_bad_options_raise_config_error_naming_the_option(option):
    name = next(iter(option))
    with pytest.raises(ConfigError, match=name):
        RepositoryOptions(**option)


def test_bad_version_or_onnx_file_writes_nothing(
    tmp_path, tiny_classifier_spec, tiny_classifier_onnx
):
    with pytest.raises(ConfigError, match="version"):
        write_model_set(tmp_path, tiny_classifier_spec, tiny_classifier_onnx, version=0)
    with pytest.raises(ConfigError, match=r"nope\.onnx"):
        write_model_set(tmp_path, tiny_classifier_spec, tmp_path / "nope.onnx")
    assert list_models(tmp_path) == []


def test_next_version_and_rewriting_a_version(tmp_path, tiny_classifier_spec, tiny_classifier_onnx):
    first = write_model_set(tmp_path, tiny_classifier_spec, tiny_classifier_onnx)
    assert first.version == 1
    (first.classifier / "1" / "stale.txt").write_text("from the old version")
    second = write_model_set(tmp_path, tiny_classifier_spec, tiny_classifier_onnx)
    assert second.version == 2 == next_version(first.classifier) - 1
    assert (first.classifier / "1" / "stale.txt").exists()  # a new version leaves v1 alone
    other = tmp_path / "other.onnx"
    other.write_bytes(b"not the same model")
    write_model_set(tmp_path, tiny_classifier_spec, other, version=1)  # explicit: replaced whole
    assert (first.classifier / "1" / "model.onnx").read_bytes() == b"not the same model"
    assert not (first.classifier / "1" / "stale.txt").exists()
    # no staging leftovers; both versions present
    assert sorted(p.name for p in first.classifier.iterdir()) == [
        "1",
        "2",
        "config.pbtxt",
        "labels.txt",
    ]
    assert sorted(p.name for p in first.ensemble.iterdir()) == ["1", "config.pbtxt", "labels.txt"]


def test_list_models_needs_a_config(tmp_path, tiny_classifier_spec, tiny_classifier_onnx):
    assert list_models(tmp_path) == []
    (tmp_path / "half-written" / "1").mkdir(parents=True)
    assert list_models(tmp_path) == []
    write_model_set(tmp_path, tiny_classifier_spec, tiny_classifier_onnx)
    assert list_models(tmp_path) == [MODEL, CLASSIFIER, PREPROCESS]
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
