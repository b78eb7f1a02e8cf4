"""Clinical metrics: values checked against scikit-learn and by hand, thresholds from val,
bootstrap CIs, undefined cases, and the PNG/Markdown/JSON artifacts in a real MLflow store."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from training.errors import ConfigError, DataError, RegistryError
from training.metrics import (
    _per_class,
    _weights,
    choose_thresholds,
    clinical_report,
    evaluate,
)
from training.plots import (
    confusion_figure,
    log_clinical_report,
    log_test_plots,
    multilabel_confusion_figure,
    roc_figure,
)
from training.spec import ModelSpec

BINARY, MULTI_LABEL, MULTI_CLASS = "binary-class", "multi-label, binary-class", "multi-class"
PNG = b"\x89PNG\r\n\x1a\n"

# 4 positives, 6 negatives. At t = 0.5: TP 3 (.9 .8 .7), FN 1 (.3), FP 1 (.6), TN 5.
# AUC by hand: (6 + 6 + 6 + 4 + 0.5 tie) / 24 = 0.9375.
HAND_Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])[:, None]
HAND_P1 = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.1, 0.2, 0.3])
HAND_P = np.c_[1 - HAND_P1, HAND_P1]


def _binary(n: int, seed: int, prevalence: float = 0.6):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    p1 = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y[:, None], np.c_[1 - p1, p1]


def test_known_confusion_matrix_by_hand_and_sklearn():
    r = clinical_report(BINARY, HAND_Y, HAND_P, [0.5], ("normal", "pneumonia"), n_boot=200)
    o = r.overall
    assert o["sensitivity"].value == pytest.approx(3 / 4)
    assert o["specificity"].value == pytest.approx(5 / 6)
    assert o["ppv"].value == pytest.approx(3 / 4)
    assert o["npv"].value == pytest.approx(5 / 6)
    assert o["f1"].value == pytest.approx(0.75)
    assert o["auc"].value == pytest.approx(0.9375)
    assert o["acc"].value == pytest.approx(0.8) == o["acc_at_threshold"].value
    y, pred = HAND_Y[:, 0], (HAND_P1 >= 0.5).astype(int)
    assert o["sensitivity"].value == pytest.approx(recall_score(y, pred))
    assert o["specificity"].value == pytest.approx(recall_score(y, pred, pos_label=0))
    assert o["auc"].value == pytest.approx(roc_auc_score(y, HAND_P1))
    assert evaluate(BINARY, HAND_Y, HAND_P) == {"auc": o["auc"].value, "acc": o["acc"].value}
    flat = r.flat_metrics()
    assert flat["test_sensitivity"] == pytest.approx(0.75)
    assert flat["test_threshold"] == 0.5
    assert {"test_sensitivity_ci_low", "test_sensitivity_ci_high", "test_auc"} <= set(flat)


def test_bootstrap_replicates_equal_sklearn_on_the_resampled_cases():
    rng = np.random.default_rng(3)
    n, k = 60, 3
    truth = rng.random((n, k)) < 0.3
    scores = np.round(np.clip(0.3 * truth + 0.7 * rng.random((n, k)), 0, 1), 1)  # many ties
    pred = scores >= 0.5
    w = _weights(n, 8, rng)
    assert (w.sum(1) == n).all()
    reps = _per_class(w, truth, scores, pred)
    for b in range(len(w)):
        idx = np.repeat(np.arange(n), w[b].astype(int))
        for c in range(k):
            y, p, s = truth[idx, c].astype(int), pred[idx, c].astype(int), scores[idx, c]
            nan = {"zero_division": np.nan}
            expected = {
                "sensitivity": recall_score(y, p, **nan),
                "specificity": recall_score(y, p, pos_label=0, **nan),
                "ppv": precision_score(y, p, **nan),
                "npv": precision_score(y, p, pos_label=0, **nan),
                "f1": f1_score(y, p, **nan),
                "auc": roc_auc_score(y, s) if 0 < y.sum() < len(y) else np.nan,
            }
            for metric, value in expected.items():
                np.testing.assert_allclose(reps[metric][b, c], value, rtol=1e-6, err_msg=metric)


def test_ci_contains_the_point_estimate_and_narrows_with_more_data():
    widths = []
    for n in (150, 3000):
        y, p = _binary(n, seed=n)
        r = clinical_report(BINARY, y, p, [0.5], ("a", "b"), n_boot=400, seed=1)
        for metric, e in r.overall.items():
            assert e.ci_low <= e.value <= e.ci_high, (n, metric, e)
            assert e.n_boot == 400
        widths.append({m: e.ci_high - e.ci_low for m, e in r.overall.items()})
    for metric in ("auc", "sensitivity", "specificity", "ppv", "npv", "f1"):
        assert widths[1][metric] < widths[0][metric] / 2, metric


def test_threshold_chosen_on_val_is_applied_to_test():
    def split(pos, neg):
        p1 = np.array(pos + neg)
        return np.array([1] * len(pos) + [0] * len(neg))[:, None], np.c_[1 - p1, p1]

    val_y, val_p = split([0.8, 0.85, 0.9, 0.95], [0.1, 0.2, 0.3, 0.7])
    test_y, test_p = split([0.75, 0.78, 0.9, 0.95], [0.1, 0.2, 0.3, 0.6])
    t = choose_thresholds(BINARY, val_y, val_p)
    assert t.tolist() == [0.8]  # Youden on val: every positive, no negative
    assert choose_thresholds(BINARY, test_y, test_p).tolist() == [0.75]  # what test would pick
    r = clinical_report(BINARY, test_y, test_p, t, ("n", "p"), n_boot=50)
    assert r.thresholds == (0.8,)
    assert r.overall["sensitivity"].value == 0.5  # 0.75 and 0.78 fall below val's 0.8
    assert r.overall["specificity"].value == 1.0
    assert r.to_dict()["thresholds"] == [0.8] and r.to_dict()["rule"] == "youden"


def test_sensitivity_and_specificity_rules():
    pos, neg = np.linspace(0.1, 1.0, 10), np.linspace(0.05, 0.95, 10)
    y = np.r_[np.ones(10), np.zeros(10)].astype(int)[:, None]
    p = np.c_[1 - np.r_[pos, neg], np.r_[pos, neg]]
    # the highest threshold keeping 9 of 10 positives above it: 0.2
    assert choose_thresholds(BINARY, y, p, rule="sens90")[0] == pytest.approx(0.2)
    # the lowest threshold with at most 2 of 10 negatives above it: 0.8 (0.85 and 0.95)
    assert choose_thresholds(BINARY, y, p, rule="spec80")[0] == pytest.approx(0.8)
    with pytest.raises(ConfigError, match="youden"):
        choose_thresholds(BINARY, y, p, rule="best")


def test_multi_label_per_finding_auc_thresholds_and_an_absent_finding():
    rng = np.random.default_rng(7)
    n, names = 120, ("atelectasis", "effusion", "hernia")
    y = (rng.random((n, 3)) < [0.3, 0.5, 0.0]).astype(int)  # no hernia in this split
    p = np.clip(0.3 * y + 0.7 * rng.random((n, 3)), 0, 1)
    val_y = (rng.random((n, 3)) < 0.4).astype(int)
    t = choose_thresholds(MULTI_LABEL, val_y, np.clip(0.3 * val_y + 0.7 * rng.random((n, 3)), 0, 1))
    assert t.shape == (3,)
    r = clinical_report(MULTI_LABEL, y, p, t, names, n_boot=300)
    for c, name in enumerate(names[:2]):
        assert r.per_class[name]["auc"].value == pytest.approx(roc_auc_score(y[:, c], p[:, c]))
        pred = (p[:, c] >= t[c]).astype(int)
        assert r.per_class[name]["sensitivity"].value == pytest.approx(recall_score(y[:, c], pred))
    hernia = r.per_class["hernia"]
    assert math.isnan(hernia["auc"].value) and "single class" in hernia["auc"].note
    assert math.isnan(hernia["sensitivity"].value) and "no positive" in hernia["sensitivity"].note
    assert hernia["specificity"].value == pytest.approx(np.mean(p[:, 2] < t[2]))
    assert r.overall["auc"].value == pytest.approx(evaluate(MULTI_LABEL, y, p)["auc"])
    assert "2 of 3 classes" in r.overall["auc"].note
    flat = r.flat_metrics()
    assert flat["test_auc_effusion"] == r.per_class["effusion"]["auc"].value
    assert flat["test_threshold_hernia"] == t[2]
    text = r.to_markdown()
    assert "| hernia | 0 |" in text and "undefined: no positive case" in text
    assert (
        json.loads(json.dumps(r.to_dict(), allow_nan=False))["per_class"]["hernia"]["auc"]["value"]
        is None
    )


def test_multi_class_uses_the_arg_max_one_vs_rest():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 200)
    p = rng.dirichlet(np.ones(4), 200)
    p[np.arange(200), y] += 0.4
    p /= p.sum(1, keepdims=True)
    assert choose_thresholds(MULTI_CLASS, y[:, None], p).shape == (0,)
    r = clinical_report(MULTI_CLASS, y[:, None], p, [], tuple("abcd"), n_boot=200)
    arg = p.argmax(1)
    assert r.rule == "argmax" and r.thresholds == ()
    assert r.overall["sensitivity"].value == pytest.approx(balanced_accuracy_score(y, arg))
    ppv = precision_score(y, arg, average=None)
    assert [r.per_class[c]["ppv"].value for c in "abcd"] == pytest.approx(ppv)
    assert r.overall["acc"].value == pytest.approx(evaluate(MULTI_CLASS, y[:, None], p)["acc"])
    assert "acc_at_threshold" not in r.overall and "arg-max" in r.to_markdown()


def test_undefined_metrics_are_nan_with_a_reason_and_skipped_resamples_are_counted():
    y, p = np.zeros((40, 1), int), np.c_[np.linspace(1, 0, 40), np.linspace(0, 1, 40)]
    r = clinical_report(BINARY, y, p, [0.5], ("a", "b"), n_boot=100)
    assert math.isnan(r.overall["auc"].value) and "single class" in r.overall["auc"].note
    assert math.isnan(r.overall["sensitivity"].value)
    assert r.overall["specificity"].value == pytest.approx(0.5)
    assert "undefined: no positive case" in r.to_markdown()
    # one positive in 30: about a third of the resamples miss it and are skipped for AUC
    y, p = _binary(30, seed=2, prevalence=0.0)
    y[0, 0], p[0] = 1, [0.1, 0.9]
    r = clinical_report(BINARY, y, p, [0.5], ("a", "b"), n_boot=500)
    auc = r.overall["auc"]
    assert 250 < auc.n_boot < 420 and math.isfinite(auc.ci_low)
    assert f"{auc.n_boot}/500" in r.to_markdown()
    assert clinical_report(BINARY, y, p, [0.5], ("a", "b"), n_boot=0).overall["auc"].note


def test_bad_inputs():
    with pytest.raises(DataError, match="thresholds"):
        clinical_report(BINARY, HAND_Y, HAND_P, [0.5, 0.6], ("a", "b"))
    with pytest.raises(DataError, match="labels"):
        clinical_report(BINARY, HAND_Y[:5], HAND_P, [0.5], ("a", "b"))
    with pytest.raises(ConfigError, match="task"):
        choose_thresholds("regression", HAND_Y, HAND_P)


def test_speed_binary_624_cases_1000_resamples():
    y, p = _binary(624, seed=0)
    start = time.perf_counter()
    clinical_report(BINARY, y, p, [0.5], ("a", "b"), n_boot=1000)
    assert time.perf_counter() - start < 3.0


def test_figures_mark_the_operating_point_and_use_the_threshold():
    roc = roc_figure(HAND_Y, HAND_P, ("n", "p"), thresholds=[0.5])
    points = [(ln.get_xdata()[0], ln.get_ydata()[0]) for ln in roc.axes[0].get_lines()]
    assert (pytest.approx(1 / 6), pytest.approx(3 / 4)) in points
    # [[TN, FP], [FN, TP]]: 0.65 turns the 0.6 negative into a true negative
    texts = lambda fig: [t.get_text() for t in fig.axes[0].texts]  # noqa: E731
    assert texts(confusion_figure(HAND_Y, HAND_P, ("n", "p"), threshold=0.65)) == list("6013")
    assert texts(confusion_figure(HAND_Y, HAND_P, ("n", "p"))) == list("5113")
    ml_y = np.c_[HAND_Y, 1 - HAND_Y]
    fig = multilabel_confusion_figure(ml_y, np.c_[HAND_P1, 1 - HAND_P1], ("x", "y"), [0.5, 0.5])
    assert texts(fig) == ["3", "1", "1", "5", "5", "1", "1", "3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import mlflow

    from training.registry import ensure_experiment

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield uri, ensure_experiment(uri, "metrics-test")
    mlflow.set_tracking_uri(previous)


@pytest.mark.parametrize(
    ("task", "names"),
    [(BINARY, ("normal", "pneumonia")), (MULTI_LABEL, ("a", "b c")), (MULTI_CLASS, tuple("xyz"))],
)
def test_plots_and_report_are_logged_to_mlflow(store, tmp_path, task, names):
    import mlflow
    from mlflow import MlflowClient

    uri, experiment_id = store
    rng = np.random.default_rng(0)
    if task == MULTI_LABEL:
        y = (rng.random((80, 2)) < 0.4).astype(int)
        p = np.clip(0.4 * y + 0.6 * rng.random((80, 2)), 0, 1)
    else:
        y = rng.integers(0, len(names), 80)[:, None]
        p = rng.dirichlet(np.ones(len(names)), 80)
    spec = ModelSpec(dataset="x", task=task, class_names=names, image_size=32, channels=1)
    t = choose_thresholds(task, y, p)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        log_test_plots(spec, y, p, thresholds=t)
        log_clinical_report(clinical_report(task, y, p, t, names, n_boot=100))
    client = MlflowClient(tracking_uri=uri)
    for name in ("plots/roc_test.png", "plots/confusion_test.png"):
        data = Path(client.download_artifacts(run.info.run_id, name, str(tmp_path))).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name
    folder = Path(client.download_artifacts(run.info.run_id, "reports", str(tmp_path)))
    assert (folder / "clinical_report.md").read_text().startswith("### Clinical metrics")
    report = json.loads((folder / "clinical_report.json").read_text())
    assert report["task"] == task and report["markdown"].startswith("### Clinical metrics")
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["test_sensitivity"] == pytest.approx(report["overall"]["sensitivity"]["value"])
    assert {"test_auc_ci_low", "test_f1_ci_high"} <= set(metrics)
    if task != BINARY:
        assert f"test_auc_{names[1].replace(' ', '_')}" in metrics


def test_logging_needs_an_active_run():
    r = clinical_report(BINARY, HAND_Y, HAND_P, [0.5], ("a", "b"), n_boot=10)
    with pytest.raises(RegistryError, match="active MLflow run"):
        log_clinical_report(r)
