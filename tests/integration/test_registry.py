"""The model in a real MLflow store (SQLite): logged as weights + spec and rebuilt by
``training.model``, no pickle; versions logged the old way (``mlflow.pytorch``,
pickled) still load through ``training.registry.load_model``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from training.errors import RegistryError
from training.model import ProbabilityHead, build_model
from training.registry import FLAVOR, SPEC_KEY, WEIGHTS_FILE, load_model, log_and_register
from training.spec import ModelSpec

SPEC = ModelSpec(
    dataset="pneumoniamnist",
    task="binary-class",
    class_names=("normal", "pneumonia"),
    image_size=32,
    channels=1,
)


def _served(seed: int) -> ProbabilityHead:
    torch.manual_seed(seed)
    network = build_model(SPEC.channels, SPEC.num_classes)
    with torch.no_grad():  # batch-norm statistics that differ from a fresh model's
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return ProbabilityHead(network, SPEC.multi_label).eval()


def _store(tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient(uri).create_experiment(
        "registry", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    mlflow.set_experiment(experiment_id=experiment)
    return uri


def _outputs(module: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return module.eval()(torch.randn(4, SPEC.channels, SPEC.image_size, SPEC.image_size))


def test_logged_as_weights_and_spec_loads_without_pickle(tmp_path: Path, capfd, caplog) -> None:
    uri = _store(tmp_path)
    served = _served(seed=1)
    with caplog.at_level(logging.INFO), mlflow.start_run() as run:
        model_uri, version = log_and_register(served, SPEC, "m-new")
    assert version == "1"
    said = capfd.readouterr().err + caplog.text
    assert "pickle" not in said.lower(), said[-3000:]
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path / "dl")
        )
    )
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {FLAVOR}, mlmodel["flavors"]
    assert mlmodel["metadata"][SPEC_KEY] == json.loads(SPEC.to_json())
    assert not [p for p in local.rglob("*.pkl")]
    blob = torch.load(local / WEIGHTS_FILE, weights_only=True)  # plain tensors, no code
    assert ModelSpec.from_json(blob["spec"]) == SPEC

    for ref in (model_uri, "models:/m-new/1", f"runs:/{run.info.run_id}/model"):
        loaded = load_model(uri, ref)
        assert loaded.spec == SPEC and isinstance(loaded.module, ProbabilityHead)
        torch.testing.assert_close(_outputs(loaded.module), _outputs(served))


def test_a_version_pickled_by_mlflow_pytorch_still_loads(tmp_path: Path) -> None:
    """What ``log_and_register`` wrote before the weights format."""
    import mlflow.pytorch

    uri = _store(tmp_path)
    served = _served(seed=2)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            served,
            name="model",
            serialization_format="pickle",
            metadata={SPEC_KEY: json.loads(SPEC.to_json())},
            registered_model_name="m-old",
        )
    assert "pytorch" in mlflow.models.get_model_info("models:/m-old/1").flavors
    loaded = load_model(uri, "models:/m-old/1")
    assert loaded.spec == SPEC
    torch.testing.assert_close(_outputs(loaded.module), _outputs(served))
    assert load_model(uri, info.model_uri).spec == SPEC


def test_a_model_without_the_spec_is_refused(tmp_path: Path) -> None:
    import mlflow.pytorch

    uri = _store(tmp_path)
    with mlflow.start_run():
        mlflow.pytorch.log_model(
            _served(seed=3),
            name="model",
            serialization_format="pickle",
            registered_model_name="other",
        )
    with pytest.raises(RegistryError, match=SPEC_KEY):
        load_model(uri, "models:/other/1")
