"""The subgroup audit's computation (training.audit), its cohorts (training.cohorts) and its
report files (training.audit_report): values by hand and against scikit-learn, the
patient-level bootstrap, censoring, one-class cohorts, seismometer's bands, intersections."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from training.audit import ONE_CLASS, audit, band
from training.audit_report import FILES, to_html, to_markdown, write_audit
from training.cohorts import age_band, csv_cohorts
from training.errors import ConfigError, DataError
from training.metrics import evaluate

BINARY, MULTI_LABEL, MULTI_CLASS = "binary-class", "multi-label, binary-class", "multi-class"
PNG = b"\x89PNG\r\n\x1a\n"


def _binary(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    p1 = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y[:, None], np.c_[1 - p1, p1]


def _row(result, attribute: str, value: str):
    return next(r for r in result.rows if (r.attribute, r.value) == (attribute, value))


def test_binary_values_by_hand_and_sklearn() -> None:
    # 4 positives, 6 negatives. At t = 0.5: TP 3 (.9 .8 .7), FN 1 (.3), FP 1 (.6), TN 5.
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])[:, None]
    p1 = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.1, 0.2, 0.3])
    r = audit(BINARY, y, np.c_[1 - p1, p1], {"site": ["a"] * 10}, thresholds=[0.5], n_boot=50)
    m = _row(r, "all", "all").metrics
    assert m["prevalence"].value == pytest.approx(0.4)
    assert m["auroc"].value == pytest.approx(roc_auc_score(y[:, 0], p1)) == pytest.approx(0.9375)
    assert m["sensitivity"].value == pytest.approx(3 / 4)
    assert m["specificity"].value == pytest.approx(5 / 6)
    # top-label confidence max(p, 1-p) against (p >= .5) == y, 15 bins of width 1/15
    conf = np.maximum(p1, 1 - p1)
    correct = (p1 >= 0.5) == (y[:, 0] == 1)
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum(abs((conf - correct)[bins == b].sum()) for b in range(15)) / 10
    assert m["ece"].value == pytest.approx(ece)
    assert "underdiagnosis" not in m and r.thresholds == (0.5,)


def test_positive_index_picks_the_finding_column() -> None:
    y, p = _binary(200)
    flipped = audit(BINARY, 1 - y, p[:, ::-1], {"s": ["a"] * 200}, positive_index=0, n_boot=0)
    plain = audit(BINARY, y, p, {"s": ["a"] * 200}, positive_index=1, n_boot=0)
    for m in ("prevalence", "auroc", "sensitivity", "specificity"):
        a, b = _row(flipped, "all", "all").metrics[m], _row(plain, "all", "all").metrics[m]
        assert a.value == pytest.approx(b.value)


def test_underdiagnosis_rate_by_hand() -> None:
    # ill: images 0-3 (any finding); predicted "No Finding" (nothing >= its threshold): 1 and 3
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]])
    p = np.array(
        [
            [0.9, 0.1, 0.1],
            [0.1, 0.4, 0.1],  # finding 2 at 0.4 < 0.5: missed
            [0.2, 0.8, 0.1],
            [0.1, 0.1, 0.5],  # 0.5 < threshold 0.6: missed
            [0.1, 0.7, 0.1],
            [0.1, 0.1, 0.1],
        ]
    )
    r = audit(MULTI_LABEL, y, p, {"s": ["a"] * 6}, thresholds=[0.5, 0.5, 0.6], min_cases=1)
    m = _row(r, "all", "all").metrics
    assert m["underdiagnosis"].value == pytest.approx(2 / 4)
    assert m["prevalence"].value == pytest.approx(4 / 6)  # any finding
    assert m["auroc"].value == pytest.approx(evaluate(MULTI_LABEL, y, p)["auc"])


def test_multi_class_macro_auroc_and_argmax() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)[:, None]
    p = rng.dirichlet([1, 1, 1], 300) + 0.5 * (y == np.arange(3))
    p /= p.sum(1, keepdims=True)
    r = audit(MULTI_CLASS, y, p, {"s": ["a"] * 300}, thresholds=[0.3], n_boot=0)
    m = _row(r, "all", "all").metrics
    assert "prevalence" not in m and r.thresholds == ()
    assert m["auroc"].value == pytest.approx(evaluate(MULTI_CLASS, y, p)["auc"])
    pred = p.argmax(1)
    sens = np.mean([(pred[y[:, 0] == c] == c).mean() for c in range(3)])
    assert m["sensitivity"].value == pytest.approx(sens)


def test_patient_level_bootstrap_keeps_a_patients_images_together() -> None:
    """Five identical images per patient: resampling patients gives exactly the CI of one
    image per patient (same draws), and a wider one than treating the 200 images as 200
    independent cases."""
    y, p = _binary(40, seed=3)
    rep = np.repeat(np.arange(40), 5)
    ids = np.array([f"p{i:02d}" for i in rep])
    kw = {"thresholds": [0.5], "n_boot": 400, "seed": 7}
    by_patient = audit(BINARY, y[rep], p[rep], {"s": ["a"] * 200}, patients=ids, **kw)
    one_each = audit(BINARY, y, p, {"s": ["a"] * 40}, **kw)
    by_image = audit(BINARY, y[rep], p[rep], {"s": ["a"] * 200}, **kw)
    for m in ("auroc", "sensitivity", "specificity", "ece"):
        a, b = _row(by_patient, "all", "all").metrics[m], _row(one_each, "all", "all").metrics[m]
        assert (a.ci_low, a.ci_high) == pytest.approx((b.ci_low, b.ci_high), abs=1e-5)
        c = _row(by_image, "all", "all").metrics[m]
        assert (a.ci_high - a.ci_low) > 1.6 * (c.ci_high - c.ci_low), m
    assert by_patient.n_patients == 40 and _row(by_patient, "all", "all").patients == 40


def test_censoring_below_min_cases() -> None:
    y, p = _binary(100)
    site = np.array(["big"] * 81 + ["ten"] * 10 + ["nine"] * 9)
    r = audit(BINARY, y, p, {"site": site}, n_boot=50)
    nine, ten = _row(r, "site", "nine"), _row(r, "site", "ten")
    assert nine.censored and nine.n == 9 and not nine.metrics and not nine.ratios
    assert set(nine.bands.values()) == {"censored"}
    assert not ten.censored and ten.metrics["auroc"].value == ten.metrics["auroc"].value
    assert "censored" in to_markdown(r)


def test_one_class_column_and_one_class_cohort_do_not_crash() -> None:
    y, p = _binary(60)
    y[:20] = 0  # cohort "neg" holds negatives only: AUROC and sensitivity undefined
    cohorts = {"scanner": ["X1"] * 60, "site": ["neg"] * 20 + ["mix"] * 40}
    r = audit(BINARY, y, p, cohorts, n_boot=50)
    x1 = _row(r, "scanner", "X1")
    assert set(x1.bands.values()) == {ONE_CLASS} and not x1.ratios
    neg = _row(r, "site", "neg")
    assert math.isnan(neg.metrics["auroc"].value) and neg.metrics["auroc"].note == ONE_CLASS
    assert neg.bands["auroc"] == ONE_CLASS
    assert neg.metrics["sensitivity"].note == "n/a (no positive case)"
    assert neg.bands["specificity"] in ("fine", "flagged", "critical")
    assert ONE_CLASS in to_markdown(r)


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (1.0, "fine"),
        (1.25, "fine"),
        (0.8, "fine"),
        (1.2501, "flagged"),
        (0.7999, "flagged"),
        (1.5, "flagged"),
        (1 / 1.5, "flagged"),
        (1.5001, "critical"),
        (0.6666, "critical"),
        (0.6, "critical"),
        (float("nan"), "n/a"),
        (float("inf"), "n/a"),
    ],
)
def test_seismometer_bands(ratio: float, expected: str) -> None:
    assert band(ratio) == expected


def test_wider_limit_widens_the_bands() -> None:
    assert band(1.4, limit=0.5) == "fine" and band(1.9, limit=0.5) == "flagged"
    assert band(2.1, limit=0.5) == "critical" and band(1 / 1.9, limit=0.5) == "flagged"


def test_ratios_against_the_largest_cohort_and_intersections() -> None:
    y, p = _binary(400, seed=5)
    rng = np.random.default_rng(99)  # cohorts independent of the labels
    sex = rng.choice(["F", "M"], 400, p=[0.4, 0.6])
    age = rng.choice(["20-39", "40-59", "60-79"], 400)
    r = audit(BINARY, y, p, {"sex": sex, "age": age}, n_boot=200)
    m_row, f_row = _row(r, "sex", "M"), _row(r, "sex", "F")
    assert m_row.reference and not f_row.reference and m_row.bands["auroc"] == "reference"
    auc_f, auc_m = f_row.metrics["auroc"].value, m_row.metrics["auroc"].value
    assert f_row.ratios["auroc"].value == pytest.approx(auc_f / auc_m)
    assert f_row.bands["auroc"] == band(auc_f / auc_m)
    assert (
        f_row.ratios["auroc"].ci_low <= f_row.ratios["auroc"].value <= f_row.ratios["auroc"].ci_high
    )
    assert "prevalence" not in f_row.ratios  # a property of the data, not rated
    cross = [row for row in r.rows if row.attribute == "sex × age"]
    assert len(cross) == 6 and sum(row.n for row in cross) == 400
    assert sum(row.reference for row in cross) == 1
    largest = max(cross, key=lambda row: row.n)
    assert largest.reference
    fm = _row(r, "sex × age", "F × 40-59")
    assert fm.n == int(((sex == "F") & (age == "40-59")).sum())
    none = audit(BINARY, y, p, {"sex": sex, "age": age}, n_boot=0, intersections="none")
    assert not [row for row in none.rows if "×" in row.attribute]
    three = audit(BINARY, y, p, {"sex": sex, "age": age, "v": age}, n_boot=0, intersections="all")
    assert any(row.attribute == "sex × age × v" for row in three.rows)


def test_errors_name_what_is_wrong() -> None:
    y, p = _binary(30)
    with pytest.raises(ConfigError, match="race"):
        audit(BINARY, y, p, {"sex": ["F"] * 30}, by=["race"])
    with pytest.raises(ConfigError, match="2 threshold"):
        audit(BINARY, y, p, {"sex": ["F"] * 30}, thresholds=[0.4, 0.6])
    with pytest.raises(DataError, match="sex"):
        audit(BINARY, y, p, {"sex": ["F"] * 29})
    with pytest.raises(ConfigError, match="intersections"):
        audit(BINARY, y, p, {"sex": ["F"] * 30}, intersections="some")


def test_missing_thresholds_use_half_and_say_so() -> None:
    y, p = _binary(50)
    r = audit(BINARY, y, p, {"s": ["a"] * 50}, n_boot=0)
    assert r.thresholds == (0.5,) and "no operating thresholds" in r.threshold_source


def test_age_bands() -> None:
    ages = ["0", "19", "19.5", "20", "39", "40", "59", "60", "79", "80", "95", "058Y", "6M"]
    assert [age_band(a) for a in ages] == [
        "0-19", "0-19", "0-19", "20-39", "20-39", "40-59", "40-59", "60-79", "60-79",
        "80+", "80+", "40-59", "0-19",
    ]  # fmt: skip
    assert age_band("148") == age_band("412") == age_band("") == age_band("x") == "unknown"


def test_cohort_csv_keyed_by_path_and_its_errors(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    paths = [str(root / "a" / f"{i}.png") for i in range(3)]
    table = tmp_path / "c.csv"
    table.write_text(f"path,patient_id,site\na/0.png,p1,X\n{paths[1]},p1,Y\na/2.png,,\n")
    c = csv_cohorts(table, paths, root)
    assert c.columns["site"].tolist() == ["X", "Y", "(missing)"]
    assert c.patients is not None and c.patients[:2].tolist() == ["p1", "p1"]
    table.write_text("path,site\na/0.png,X\na/2.png,Z\n")
    with pytest.raises(DataError, match=r"no row for 1 of the 3 test images: a/1\.png"):
        csv_cohorts(table, paths, root)
    table.write_text("file,site\na/0.png,X\n")
    with pytest.raises(DataError, match="missing column 'path'"):
        csv_cohorts(table, paths, root)
    table.write_text("index,site\n0,X\n1,Y\n")
    assert csv_cohorts(table, None, n=2).columns["site"].tolist() == ["X", "Y"]
    with pytest.raises(ConfigError, match="race"):
        csv_cohorts(table, None, n=2).select(["race"])


def test_report_files_escape_and_plot(tmp_path: Path) -> None:
    y, p = _binary(120)
    site = np.array(["<script>x</script>"] * 60 + ["b|c"] * 55 + ["tiny"] * 5)
    r = audit(BINARY, y, p, {"site": site}, n_boot=50)
    paths = write_audit(r, tmp_path / "out", {"title": "m <1>", "sources": "site: test"})
    assert sorted(p.name for p in paths.values()) == sorted(FILES)
    page = to_html(r, {"title": "m <1>"})
    assert "<script>x" not in page and "&lt;script&gt;" in page and "m &lt;1&gt;" in page
    assert "b\\|c" in to_markdown(r)
    assert paths["forest.png"].read_bytes().startswith(PNG)
    data = json.loads(paths["audit.json"].read_text())
    assert data["rows"][0]["attribute"] == "all" and data["meta"]["sources"] == "site: test"
