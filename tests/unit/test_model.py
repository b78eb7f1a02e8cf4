"""DenseNet-121 adapted to the data set's channels and classes; the metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.errors import ConfigError
from training.metrics import evaluate
from training.model import ProbabilityHead, build_model


@pytest.mark.parametrize(("channels", "classes"), [(1, 2), (3, 9)])
def test_model_output_shape(channels: int, classes: int) -> None:
    model = build_model(channels, classes).eval()
    with torch.no_grad():
        logits = model(torch.randn(3, channels, 32, 32))
        probs = ProbabilityHead(model, multi_label=False)(torch.randn(3, channels, 32, 32))
    assert logits.shape == (3, classes)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    assert model.features.conv0.in_channels == channels


def test_model_rejects_bad_shapes() -> None:
    with pytest.raises(ConfigError, match="in_channels"):
        build_model(2, 2)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(1, 1)


def test_metrics_follow_the_ranking() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(200, 1))
    p1 = np.where(y[:, 0] == 1, rng.uniform(0.6, 1, 200), rng.uniform(0, 0.4, 200))
    perfect = evaluate("binary-class", y, np.stack([1 - p1, p1], axis=1))
    assert perfect == {"auc": 1.0, "acc": 1.0}
    inverted = evaluate("binary-class", y, np.stack([p1, 1 - p1], axis=1))
    assert inverted == {"auc": 0.0, "acc": 0.0}
    noisy = evaluate("binary-class", y, np.stack([1 - p1, p1], axis=1)[rng.permutation(200)])
    assert 0.3 < noisy["auc"] < 0.7


def test_multiclass_metrics() -> None:
    y = np.array([[0], [1], [2], [2]])
    probs = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3
    scores = evaluate("multi-class", y, probs)
    assert scores["acc"] == 0.75
    assert 0.5 < scores["auc"] < 1.0


def test_config_makes_paths_absolute(tmp_path, monkeypatch) -> None:
    """Ray workers run in another directory: relative data, store and MLflow paths are resolved."""
    from training.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(data_dir="data", tracking_uri="sqlite:///runs/mlflow.db", storage_path="ray")
    assert cfg.data_dir == str(tmp_path / "data")
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert cfg.storage_path == str(tmp_path / "ray")
    assert TrainConfig(tracking_uri="http://127.0.0.1:5000").tracking_uri == "http://127.0.0.1:5000"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


class _Payload:
    """An object whose unpickling would run code: a weights file must never hold one."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_weights_round_trip_without_unpickling_code(tmp_path) -> None:
    from training.model import load_weights, save_weights
    from training.spec import ModelSpec

    spec = ModelSpec("pneumoniamnist", "binary-class", ("normal", "pneumonia"), 32, 1)
    model = build_model(1, 2).eval()
    save_weights(torch.nn.parallel.DataParallel(model), tmp_path / "w.pt", spec.to_json())
    state, spec_json = load_weights(tmp_path / "w.pt")
    rebuilt = build_model(1, 2).eval()
    rebuilt.load_state_dict(state)  # DDP/DataParallel's "module." prefix is gone
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    assert ModelSpec.from_json(spec_json) == spec
    torch.save({"state_dict": {}, "spec": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_weights(tmp_path / "evil.pt")
