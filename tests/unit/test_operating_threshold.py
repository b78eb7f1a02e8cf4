"""The served label of a binary model is decided at its operating threshold (chosen on
validation, stored in the spec), not by the arg-max; ``--threshold`` overrides it; other
tasks and versions without a threshold keep the arg-max."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.clients.contract import ModelContract
from serving.pipeline import accuracy_at_threshold
from training.errors import ConfigError
from training.spec import ModelSpec

BINARY = ModelSpec(
    "pneumoniamnist", "binary-class", ("normal", "pneumonia"), 64, 1, positive_class="pneumonia"
)


def _contract(spec: ModelSpec) -> ModelContract:
    return ModelContract("m", "m_onnx", spec, 8, True)


def test_the_operating_threshold_decides_the_label() -> None:
    contract = _contract(BINARY.with_fields(thresholds=(0.3,)))
    low = contract.prediction("a.png", np.array([0.62, 0.38]))  # arg-max would say normal
    assert (low.label, low.argmax_label, low.threshold) == ("pneumonia", "normal", 0.3)
    assert json.loads(low.as_json())["threshold"] == 0.3
    assert contract.prediction("b.png", np.array([0.8, 0.2])).label == "normal"
    # the finding need not be column 1: BreastMNIST's is label 0
    breast = ModelSpec("breastmnist", "binary-class", ("malignant", "normal, benign"), 64, 1)
    breast = breast.with_fields(positive_class="malignant", thresholds=(0.2,))
    assert _contract(breast).prediction("c.png", np.array([0.25, 0.75])).label == "malignant"


def test_threshold_override_and_its_errors() -> None:
    contract = _contract(BINARY.with_fields(thresholds=(0.3,))).with_threshold(0.5)
    assert contract.prediction("a.png", np.array([0.62, 0.38])).label == "normal"
    with pytest.raises(ConfigError, match=r"expected a probability in \[0, 1\]"):
        contract.with_threshold(1.5)
    multi = ModelSpec("bloodmnist", "multi-class", ("a", "b", "c"), 64, 3)
    with pytest.raises(ConfigError, match="binary models only"):
        _contract(multi).with_threshold(0.5)


def test_without_a_threshold_the_arg_max() -> None:
    old = _contract(BINARY).prediction("a.png", np.array([0.62, 0.38]))
    assert (old.label, old.threshold) == ("normal", None)
    assert "threshold" not in json.loads(old.as_json())


def test_accuracy_at_threshold() -> None:
    labels = np.array([[1], [1], [0], [0]])
    probs = np.array([[0.6, 0.4], [0.2, 0.8], [0.9, 0.1], [0.62, 0.38]])
    spec = BINARY.with_fields(thresholds=(0.37,))
    assert accuracy_at_threshold(spec, labels, probs) == pytest.approx(0.75)  # 0.38 >= 0.37: wrong
    assert accuracy_at_threshold(BINARY, labels, probs) is None
