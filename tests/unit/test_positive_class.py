"""The positive class is the finding: BreastMNIST's label 0 (malignant), PneumoniaMNIST's
label 1 (pneumonia), a folder data set's class not named like normal/benign; every
threshold metric, the operating threshold and the plots are about it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.metrics import recall_score

from training.errors import ConfigError
from training.metrics import choose_thresholds, clinical_report
from training.plots import confusion_figure, roc_figure
from training.spec import ModelSpec, positive_class_for


def test_medmnist_findings():
    breast = ModelSpec.for_dataset("breastmnist", 64)
    assert breast.class_names[0] == "malignant"
    assert (breast.positive_class, breast.positive_index, breast.finding) == (
        "malignant",
        0,
        "malignant",
    )
    pneumonia = ModelSpec.for_dataset("pneumoniamnist", 64)
    assert (pneumonia.positive_class, pneumonia.positive_index) == ("pneumonia", 1)
    assert ModelSpec.for_dataset("bloodmnist", 64).positive_class == ""  # multi-class: none


@pytest.mark.parametrize(
    ("classes", "given", "expected"),
    [
        (("benign", "tumour"), "", "tumour"),
        (("Normal", "effusion"), "", "effusion"),
        (("cat", "dog"), "DOG", "dog"),
    ],
)
def test_folder_positive_class(classes, given, expected):
    assert positive_class_for("folder", "binary-class", classes, given) == expected


def test_folder_positive_class_must_be_named_when_unclear():
    with pytest.raises(ConfigError, match="--positive-class"):
        positive_class_for("folder", "binary-class", ("cat", "dog"))
    with pytest.raises(ConfigError, match="not a class"):
        positive_class_for("folder", "binary-class", ("cat", "dog"), "bird")
    with pytest.raises(ConfigError, match="only binary"):
        positive_class_for("bloodmnist", "multi-class", ("a", "b", "c"), "a")


def test_old_spec_keeps_label_one_with_a_warning(caplog):
    data = ModelSpec.for_dataset("breastmnist", 64, name="old-breast").__dict__.copy()
    data.pop("positive_class")
    old = ModelSpec.from_dict(data)
    with caplog.at_level(logging.WARNING):
        assert old.positive_index == 1
    assert "label 1" in caplog.text and "normal, benign" in caplog.text


def _scores(seed: int = 0, n: int = 400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p0 = np.clip(0.5 + 0.35 * (2 * (y == 0) - 1) + rng.normal(0, 0.25, n), 0.001, 0.999)
    return y[:, None], np.stack([p0, 1 - p0], axis=1)


def test_metrics_are_about_the_finding():
    labels, probs = _scores()
    t = choose_thresholds("binary-class", labels, probs, positive=0)
    # the same threshold as on the mirrored problem where the finding is label 1
    mirrored = choose_thresholds("binary-class", 1 - labels, probs[:, ::-1], positive=1)
    assert t == pytest.approx(mirrored)
    report = clinical_report(
        "binary-class", labels, probs, t, ("malignant", "benign"), n_boot=50, positive=0
    )
    predicted_malignant = probs[:, 0] >= t[0]
    expected = recall_score(labels[:, 0] == 0, predicted_malignant)
    assert report.overall["sensitivity"].value == pytest.approx(expected)
    assert report.positives == {"malignant": int((labels == 0).sum())}
    assert "P(malignant)" in report.to_markdown()
    # label 1 as positive gives another sensitivity: the choice matters
    other = clinical_report(
        "binary-class", labels, probs, 1 - t, ("malignant", "benign"), n_boot=50
    )
    assert other.positives == {"benign": int((labels == 1).sum())}


def test_plots_use_the_finding():
    labels, probs = _scores()
    fig = roc_figure(labels, probs, ("malignant", "benign"), thresholds=[0.5], positive=0)
    assert fig.axes[0].get_lines()[0].get_label().startswith("malignant")
    fig = confusion_figure(labels, probs, ("malignant", "benign"), 0.5, positive=0)
    assert "P(malignant)" in fig.axes[0].get_title()
