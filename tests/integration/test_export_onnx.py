"""ONNX export of the trained model: checker, dynamic batch, parity of both outputs
(probabilities and class activation maps), the Triton config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tritonclient.grpc import model_config_pb2

from serving.export.onnx import (
    CAM_PARITY_ATOL,
    PARITY_ATOL,
    parity,
    parity_by_output,
    parity_images,
)
from serving.repository.layout import read_config, spec_from_config
from tests.fixtures.pipeline import scratch_of
from training.cam import CamHead

pytestmark = pytest.mark.timeout(600)


def test_onnx_is_valid_with_dynamic_batch(exported) -> None:
    loaded, _, report = exported
    model = onnx.load(str(report.onnx_path))
    onnx.checker.check_model(model)
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch axis
    assert [o.name for o in model.graph.output] == ["probabilities", "cam"]
    session = ort.InferenceSession(str(report.onnx_path), providers=["CPUExecutionProvider"])
    spec = loaded.spec
    side = spec.image_size // 32  # DenseNet-121's last feature map
    for n in (1, 5, 32):
        out, cam = session.run(
            None, {"input": np.zeros((n, 1, spec.image_size, spec.image_size), np.float32)}
        )
        assert out.shape == (n, 2) and cam.shape == (n, 2, side, side)


def test_parity_with_pytorch_on_real_images(exported, data_dir) -> None:
    loaded, _, report = exported
    assert report.parity_batches == (1, 7, 32)
    assert report.max_abs_diff <= PARITY_ATOL
    images = parity_images(loaded.spec, str(data_dir), 16)
    assert parity(loaded.module, report.onnx_path, images, (16,)) <= PARITY_ATOL
    head = CamHead.from_head(loaded.module)
    probs_diff, cam_diff = parity_by_output(head, report.onnx_path, images, (1, 16))
    assert probs_diff <= PARITY_ATOL and cam_diff <= CAM_PARITY_ATOL
    print(f"\nONNX parity on 16 real images: probabilities {probs_diff:.2e}, maps {cam_diff:.2e}")


def test_parity_catches_a_different_model(exported, data_dir) -> None:
    loaded, _, report = exported
    other = loaded.module
    with torch.no_grad():
        state = {k: v.clone() for k, v in other.state_dict().items()}
        other.model.classifier.bias[0] += 0.5  # shifts the softmax (a shift of both would not)
    try:
        images = parity_images(loaded.spec, str(data_dir), 8)
        assert parity(other, report.onnx_path, images, (8,)) > PARITY_ATOL
    finally:
        other.load_state_dict(state)


def test_configs_parse_back(exported) -> None:
    loaded, repository, report = exported
    config = read_config(report.models.classifier / "config.pbtxt")
    assert isinstance(config, model_config_pb2.ModelConfig)
    assert config.name == "pneumoniamnist-densenet121_onnx" and config.backend == "python"
    assert config.max_batch_size >= 32 and config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, loaded.spec.image_size, loaded.spec.image_size]
    assert list(config.output[0].dims) == [2] and config.output[0].label_filename == "labels.txt"
    assert spec_from_config(config) == loaded.spec.with_fields(cam_name="cam")
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("probabilities", [2]),
        ("cam", [2, -1, -1]),
    ]
    assert (report.models.classifier / str(report.version) / "model.py").exists()
    ensemble = read_config(report.model_dir)
    assert (ensemble.name, ensemble.platform) == ("pneumoniamnist-densenet121", "ensemble")
    assert spec_from_config(ensemble) == loaded.spec.with_fields(cam_name="cam")
    assert [o.name for o in ensemble.output] == ["probabilities", "cam"]
    assert (report.model_dir / "labels.txt").read_text().split() == ["normal", "pneumonia"]
    preprocess = read_config(report.models.preprocess)
    assert list(preprocess.output[0].dims) == list(config.input[0].dims)
    assert report.version == 1 and Path(repository).is_dir()


def test_cli_export_wrote_the_run_model(exported, trained) -> None:
    """The ``exported`` fixture ran ``medimg export --run-id``; its ONNX is the run's model."""
    _, outcome = trained
    loaded, _, report = exported
    assert loaded.spec.model_name == outcome.model_name
    assert report.onnx_path.stat().st_size > 1_000_000
    assert 0 <= report.max_abs_diff <= PARITY_ATOL
    # neither the export nor loading the model back left a copy of it in the temp dir
    # (importing onnxruntime 1.32 writes a 51-byte ".ses" there, which is not ours to remove)
    left = [p.name for p in scratch_of(report.models.ensemble.parent).iterdir()]
    assert [name for name in left if name != ".ses"] == []
