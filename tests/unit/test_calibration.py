"""Temperature scaling and calibration metrics: recovered temperatures on synthetic logits,
AUROC before/after, ECE/Brier/NLL by hand and against scikit-learn, the bootstrap, and the
reliability PNG, Markdown and JSON in a real MLflow store."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from training.calibration import (
    _as_probs,
    _replicates,
    calibrate,
    calibration_metrics,
    fit_temperature,
    mass_bins,
)
from training.errors import DataError, RegistryError
from training.metrics import _weights, evaluate
from training.model import probabilities
from training.reliability import log_calibration, reliability_curve, reliability_figure

BINARY, MULTI_LABEL, MULTI_CLASS = "binary-class", "multi-label, binary-class", "multi-class"
PNG = b"\x89PNG\r\n\x1a\n"

# Binary by hand. Top-label confidences .95 .92 .91 .75 .55, correct 1 1 0 0 1; bins of 1/15:
# (.933, 1]: |1 - .95| = .05; (.867, .933]: 2 * |.5 - .915| = .83; (.733, .8]: .75;
# (.533, .6]: .45  ->  ECE = 2.08 / 5 = .416. Class-wise (p1 vs y, and p0 vs 1 - y, each one
# case per bin): (.05 + .08 + .91 + .75 + .45) / 5 = .448; equal-mass: 5 cases, one per bin:
# the same .448. Brier: (.05² + .08² + .91² + .75² + .45²) / 5 = .3204.
HAND_Y = np.array([[1], [0], [0], [1], [1]])
HAND_P1 = np.array([0.95, 0.08, 0.91, 0.25, 0.55])
HAND_P = np.c_[1 - HAND_P1, HAND_P1]


def _softmax_logits(n: int, k: int, seed: int, scale: float = 3.0):
    """Logits ``scale`` times too confident: labels drawn from softmax(z) (Gumbel-max)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    return scale * z, (z + rng.gumbel(size=z.shape)).argmax(1)[:, None]


def _multilabel_logits(n: int, scales, seed: int):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, len(scales)))
    return z * np.asarray(scales), (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(int)


@pytest.mark.parametrize(("task", "k"), [(BINARY, 2), (MULTI_CLASS, 5)])
def test_temperature_undoes_overconfidence_and_ece_nll_drop(task, k):
    val_z, val_y = _softmax_logits(3000, k, seed=1)
    test_z, test_y = _softmax_logits(2000, k, seed=2)
    t, report = calibrate(task, val_z, val_y, test_z, test_y, n_boot=200)
    assert len(t) == 1 and t[0] == pytest.approx(3.0, rel=0.1)
    for m in ("ece", "ece_mass", "classwise_ece", "nll", "brier"):
        assert report.after[m].value < report.before[m].value, m
    assert report.after["ece"].value < 0.05 < report.before["ece"].value
    calibrated = fit_temperature(val_z / 3, val_y, multi_label=False)
    assert calibrated[0] == pytest.approx(1.0, rel=0.1)


def test_per_label_temperatures_follow_each_labels_miscalibration():
    val_z, val_y = _multilabel_logits(10000, (0.5, 1.0, 3.0), seed=3)
    t = fit_temperature(val_z, val_y, multi_label=True)
    assert t == pytest.approx((0.5, 1.0, 3.0), rel=0.1)
    test_z, test_y = _multilabel_logits(2000, (0.5, 1.0, 3.0), seed=4)
    t2, report = calibrate(MULTI_LABEL, val_z, val_y, test_z, test_y, n_boot=100)
    assert t2 == t and report.after["nll"].value < report.before["nll"].value
    assert set(report.flat_metrics()) >= {"temperature_0", "temperature_2", "test_nll_after"}


def test_a_label_with_one_class_in_val_keeps_temperature_one(caplog):
    z, y = _multilabel_logits(500, (2.0, 2.0), seed=5)
    y[:, 1] = 0
    with caplog.at_level(logging.WARNING, logger="training.calibration"):
        t = fit_temperature(z, y, multi_label=True)
    assert t[1] == 1.0 and t[0] != 1.0 and "label 1 holds a single class" in caplog.text
    single = fit_temperature(z, np.zeros((500, 1), int), multi_label=False)
    assert single == (1.0,)


@pytest.mark.parametrize(
    ("logits", "labels", "multi_label", "match"),
    [
        (np.zeros((0, 2)), np.zeros((0, 1)), False, "no logits"),
        (np.zeros((4, 2)), np.zeros((3, 1)), False, r"labels \(3, 1\)"),
        (np.zeros((4, 3)), np.zeros((4, 2)), True, r"labels \(4, 2\)"),
        (np.array([[0.0, np.nan], [1, 2]]), np.zeros((2, 1)), False, "NaN or inf"),
        (np.zeros((4, 1)), np.zeros((4, 1)), False, "softmax needs >= 2"),
        (np.zeros((2, 2)), np.array([[0], [2]]), False, "class indices"),
        (np.zeros((2, 2)), np.array([[0, 1], [2, 0]]), True, "0/1"),
    ],
)
def test_bad_input_is_a_data_error(logits, labels, multi_label, match):
    with pytest.raises(DataError, match=match):
        fit_temperature(logits, labels, multi_label=multi_label)


def test_auroc_is_unchanged_for_binary_and_multilabel():
    """Exact while the float32 probabilities stay unsaturated (checked first: no new ties)."""
    rng = np.random.default_rng(6)
    z = np.c_[rng.uniform(-3, 3, 400), rng.uniform(-3, 3, 400)]  # differences within +-6
    y = (rng.random(400) < 1 / (1 + np.exp(z[:, 0] - z[:, 1]))).astype(int)[:, None]
    for t in ((3.0,), (0.8,), fit_temperature(z, y, multi_label=False)):
        before, after = (probabilities(z, multi_label=False, temperature=s) for s in ((1.0,), t))
        assert len(np.unique(before[:, 1])) == len(np.unique(after[:, 1])) == 400
        assert abs(roc_auc_score(y, after[:, 1]) - roc_auc_score(y, before[:, 1])) < 1e-12
        assert abs(evaluate(BINARY, y, after)["auc"] - evaluate(BINARY, y, before)["auc"]) < 1e-12
    zl = rng.uniform(-6, 6, (400, 3)) * [0.5, 1.0, 1.5]
    yl = (rng.random(zl.shape) < 1 / (1 + np.exp(-zl / [0.5, 1.0, 1.5]))).astype(int)
    t = fit_temperature(zl, yl, multi_label=True)
    assert t == pytest.approx((0.5, 1.0, 1.5), rel=0.15)
    before, after = (probabilities(zl, multi_label=True, temperature=s) for s in ((1.0,), t))
    for k in range(3):
        assert len(np.unique(before[:, k])) == len(np.unique(after[:, k])) == 400
        auc_before, auc_after = (
            roc_auc_score(yl[:, k], before[:, k]),
            roc_auc_score(yl[:, k], after[:, k]),
        )
        assert abs(auc_after - auc_before) < 1e-12
    assert (
        abs(evaluate(MULTI_LABEL, yl, after)["auc"] - evaluate(MULTI_LABEL, yl, before)["auc"])
        < 1e-12
    )


def test_float32_saturation_is_the_exception_for_binary_auroc():
    """Probabilities are float32 (as served): logit differences 20 and 18 both give 1.0, a
    tie that T = 3 breaks, so the AUC of the float32 outputs moves (not the logits' AUC)."""
    z = np.c_[np.zeros(4), [20.0, 18.0, 0.0, -1.0]]
    y = np.array([1, 0, 1, 0])
    before, after = (
        probabilities(z, multi_label=False, temperature=t)[:, 1] for t in ((1.0,), (3.0,))
    )
    assert before[0] == before[1] == 1.0
    assert roc_auc_score(y, before) == 0.625 and roc_auc_score(y, after) == 0.75


def test_multiclass_one_vs_rest_auroc_can_change_but_accuracy_cannot():
    """One T keeps each image's class order (ACC) but P(class c) also depends on the other
    logits, so it can reorder class c's scores ACROSS images: A = [2, 0, 0] (class 0) and
    B = [2.5, 3, -10] (class 1): P0(A) .787 > P0(B) .378 at T = 1, .379 < .428 at T = 10."""
    z, y = np.array([[2.0, 0, 0], [2.5, 3, -10]]), np.array([[0], [1]])
    before, after = (probabilities(z, multi_label=False, temperature=t) for t in ((1.0,), (10.0,)))
    assert evaluate(MULTI_CLASS, y, before) == {"auc": 1.0, "acc": 1.0}
    assert evaluate(MULTI_CLASS, y, after) == {"auc": 0.5, "acc": 1.0}
    # On realistic data with a fitted T the macro AUC moves, but little.
    zs, ys = _softmax_logits(2000, 5, seed=8)
    t = fit_temperature(zs, ys, multi_label=False)
    b, a = (
        evaluate(MULTI_CLASS, ys, probabilities(zs, multi_label=False, temperature=s))
        for s in ((1.0,), t)
    )
    assert a["acc"] == b["acc"] and abs(a["auc"] - b["auc"]) < 0.01


def test_metrics_by_hand():
    m = calibration_metrics(BINARY, HAND_Y, HAND_P, n_boot=0)
    assert m["ece"].value == pytest.approx(0.416, abs=1e-12)
    assert m["classwise_ece"].value == pytest.approx(0.448, abs=1e-12)
    assert m["ece_mass"].value == pytest.approx(0.448, abs=1e-12)
    assert m["brier"].value == pytest.approx(0.3204, abs=1e-12)
    single = calibration_metrics(BINARY, HAND_Y, HAND_P1[:, None], n_boot=0)  # P(class 1) only
    assert {k: e.value for k, e in single.items()} == {k: e.value for k, e in m.items()}


def test_brier_and_nll_match_sklearn():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 300)
    p1 = np.clip(0.3 * y + 0.7 * rng.random(300), 0.01, 0.99)
    m = calibration_metrics(BINARY, y[:, None], np.c_[1 - p1, p1], n_boot=0)
    assert m["brier"].value == pytest.approx(brier_score_loss(y, p1), abs=1e-12)
    assert m["nll"].value == pytest.approx(log_loss(y, p1), abs=1e-12)
    yl, pl = rng.integers(0, 2, (300, 3)), rng.uniform(0.01, 0.99, (300, 3))
    ml = calibration_metrics(MULTI_LABEL, yl, pl, n_boot=0)
    assert ml["brier"].value == pytest.approx(
        np.mean([brier_score_loss(yl[:, k], pl[:, k]) for k in range(3)])
    )
    assert ml["nll"].value == pytest.approx(
        np.mean([log_loss(yl[:, k], pl[:, k]) for k in range(3)])
    )
    yc, pc = rng.integers(0, 4, 300), rng.dirichlet(np.ones(4), 300)
    mc = calibration_metrics(MULTI_CLASS, yc[:, None], pc, n_boot=0)
    assert mc["brier"].value == pytest.approx(brier_score_loss(yc, pc, labels=range(4)), abs=1e-12)
    assert mc["nll"].value == pytest.approx(log_loss(yc, pc, labels=range(4)), abs=1e-12)


def test_equal_width_bins_are_sklearns_and_equal_mass_bins_hold_equal_counts():
    rng = np.random.default_rng(10)
    y, p = rng.integers(0, 3, 600)[:, None], rng.dirichlet(np.ones(3) * 0.5, 600)
    p[:15, :] = np.c_[np.full(15, 0.6), np.full(15, 0.4), np.zeros(15)]  # exactly on a bin edge
    conf, acc, count = reliability_curve(MULTI_CLASS, y, p)
    hit, top = (p.argmax(1) == y[:, 0]), p.max(1)
    true, pred = calibration_curve(hit, top, n_bins=15)
    assert np.allclose(acc[count > 0], true) and np.allclose(conf[count > 0], pred)
    assert calibration_metrics(MULTI_CLASS, y, p, n_boot=0)["ece"].value == pytest.approx(
        np.nansum(count * np.abs(acc - conf)) / 600, abs=1e-12
    )
    assert set(np.bincount(mass_bins(600, 15))) == {40}
    assert (
        set(np.bincount(mass_bins(601, 15))) <= {40, 41} and len(np.bincount(mass_bins(601))) == 15
    )
    order = np.argsort(top, kind="stable")  # naive equal-mass ECE: 15 sorted chunks of 40
    gaps = (hit - top)[order]
    naive = sum(abs(c.sum()) for c in np.array_split(gaps, 15)) / 600
    assert calibration_metrics(MULTI_CLASS, y, p, n_boot=0)["ece_mass"].value == pytest.approx(
        naive, abs=1e-12
    )


@pytest.mark.parametrize("task", [MULTI_CLASS, MULTI_LABEL])
def test_bootstrap_replicates_are_the_metrics_of_the_resampled_cases(task):
    rng = np.random.default_rng(11)
    if task == MULTI_LABEL:
        y, p = rng.integers(0, 2, (120, 3)), rng.uniform(0, 1, (120, 3))
    else:
        y, p = rng.integers(0, 4, 120)[:, None], rng.dirichlet(np.ones(4), 120)
    w = _weights(120, 4, np.random.default_rng(12))
    kind = "multi-label" if task == MULTI_LABEL else "multi-class"
    reps = _replicates(kind, *_as_probs(kind, y, p)[::-1], w, 15)
    for r in range(4):
        idx = np.repeat(np.arange(120), w[r].astype(int))
        again = calibration_metrics(task, y[idx], p[idx], n_boot=0)
        for m, e in again.items():
            assert reps[m][r] == pytest.approx(e.value, abs=1e-12), (m, r)


def test_cis_contain_the_value_are_seeded_and_fast():
    z, y = _softmax_logits(600, 2, seed=13)
    probs = probabilities(z, multi_label=False)
    start = time.perf_counter()
    a = calibration_metrics(BINARY, y, probs, n_boot=1000, seed=1)
    assert time.perf_counter() - start < 2
    for m, e in a.items():
        assert e.ci_low <= e.value <= e.ci_high and e.n_boot == 1000 and not e.note, m
    assert calibration_metrics(BINARY, y, probs, n_boot=1000, seed=1) == a
    assert calibration_metrics(BINARY, y, probs, n_boot=1000, seed=2)["ece"] != a["ece"]
    zl, yl = _multilabel_logits(600, (3.0,) * 14, seed=14)
    start = time.perf_counter()
    calibration_metrics(MULTI_LABEL, yl, probabilities(zl, multi_label=True), n_boot=1000)
    assert time.perf_counter() - start < 2


def test_a_value_outside_its_percentile_ci_is_flagged():
    """ECE is biased upward under resampling; near 0 (a calibrated model) the point value
    can fall below the whole percentile CI. The report says so rather than hiding it."""
    rng = np.random.default_rng(15)
    p = rng.dirichlet(np.ones(5), 2000)
    y = (np.log(p) + rng.gumbel(size=p.shape)).argmax(1)[:, None]  # labels drawn from p
    m = calibration_metrics(MULTI_CLASS, y, p, n_boot=300)
    outside = [k for k, e in m.items() if not e.ci_low <= e.value <= e.ci_high]
    assert outside and all("outside the percentile CI" in m[k].note for k in outside)
    assert all(e.value < e.ci_high for k, e in m.items() if "ece" in k)


def test_report_metrics_markdown_and_json():
    z, y = _softmax_logits(300, 3, seed=16)
    t, report = calibrate(MULTI_CLASS, z[:150], y[:150], z[150:], y[150:], n_boot=5)
    flat = report.flat_metrics()
    assert flat["temperature"] == t[0] and report.n == 150 and report.split == "test"
    assert {
        "test_ece_before",
        "test_ece_after",
        "test_brier_after_ci_low",
        "test_nll_before_ci_high",
    } <= set(flat)
    assert len(flat) == 5 * 2 * 3 + 1
    md = report.to_markdown()
    assert "| metric | before (95% CI) | after (95% CI) |" in md and "no CI: defined in 5" in md
    data = report.to_dict()
    assert data["before"]["ece"]["ci_low"] is None and data["temperature"] == list(t)
    assert json.loads(json.dumps(data, allow_nan=False)) == data


@pytest.mark.parametrize("task", [BINARY, MULTI_LABEL])
def test_reliability_figure_renders_a_png(tmp_path, task):
    import matplotlib.pyplot as plt

    if task == BINARY:
        z, y = _softmax_logits(400, 2, seed=17)
    else:
        z, y = _multilabel_logits(400, (3.0, 0.5), seed=17)
    ml = task == MULTI_LABEL
    t = fit_temperature(z, y, multi_label=ml)
    before, after = (probabilities(z, multi_label=ml, temperature=s) for s in ((1.0,), t))
    fig = reliability_figure(task, y, before, after)
    assert "ECE" in fig.axes[0].get_title() and len(fig.axes) == 2
    fig.savefig(tmp_path / "r.png")
    plt.close(fig)
    data = (tmp_path / "r.png").read_bytes()
    assert data[:8] == PNG and 10_000 < len(data) < 2_000_000


def test_log_calibration_to_a_real_mlflow_store(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    z, y = _softmax_logits(400, 2, seed=18)
    t, report = calibrate(BINARY, z[:200], y[:200], z[200:], y[200:], n_boot=100)
    before, after = (probabilities(z[200:], multi_label=False, temperature=s) for s in ((1.0,), t))
    with pytest.raises(RegistryError, match="active MLflow run"):
        log_calibration(report, reliability_figure(BINARY, y[200:], before, after))
    previous, uri = mlflow.get_tracking_uri(), f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment(
            "calibration", artifact_location=str(tmp_path / "artifacts")
        )
        with mlflow.start_run(experiment_id=experiment) as run:
            log_calibration(report, reliability_figure(BINARY, y[200:], before, after))
    finally:
        mlflow.set_tracking_uri(previous)
    client = MlflowClient(tracking_uri=uri)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["temperature"] == pytest.approx(t[0])
    assert metrics["test_ece_after"] == pytest.approx(report.after["ece"].value)
    assert math.isfinite(metrics["test_nll_before_ci_high"])
    folder = Path(client.download_artifacts(run.info.run_id, "calibration", str(tmp_path / "dl")))
    assert sorted(p.name for p in folder.iterdir()) == [
        "calibration.json",
        "calibration.md",
        "reliability.png",
    ]
    assert (folder / "calibration.md").read_text() == report.to_markdown()
    assert json.loads((folder / "calibration.json").read_text()) == report.to_dict()
    png = (folder / "reliability.png").read_bytes()
    assert png[:8] == PNG and len(png) > 10_000
