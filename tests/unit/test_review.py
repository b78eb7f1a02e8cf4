"""Review thresholds with a guarantee (training/review.py, Learn then Test) on synthetic
exchangeable data: over 200 calibration splits the realised accuracy (PPV, NPV) on a large
population meets the target in at least 1 - delta of them, while thresholds read off the
calibration split without the correction do not; the thresholds equal a brute-force
count on the raw cases; unreachable targets name the best; statistics survive JSON::

    python -m pytest tests/unit/test_review.py -q
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training.errors import ConfigError
from training.review import (
    UnreachableTarget,
    grid,
    label_thresholds,
    review_statistics,
    triage_thresholds,
)
from training.spec import ModelSpec

SPLITS = 200
CLASSES = ("common", "other", "rare")
BINARY = ("normal", "finding")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _three(rng, n: int, priors=(0.75, 0.2, 0.05), signal=(3.5, 3.0, 1.8), easy_rare=False):
    """Imbalanced 3-class cases: (labels, float32 probabilities). ``easy_rare``: half the
    rare cases are easy, half hard (confident rare predictions right, the others not)."""
    y = rng.choice(3, size=n, p=priors)
    z = rng.normal(0.0, 1.0, (n, 3))
    a = np.asarray(signal, dtype=float)[y]
    if easy_rare:
        rare = y == 2
        a[rare] = np.where(rng.random(rare.sum()) < 0.5, 6.0, 1.0)
    z[np.arange(n), y] += a
    return y, _softmax(z)


def _binary(rng, n: int, prevalence: float = 0.2):
    y = (rng.random(n) < prevalence).astype(int)
    z = rng.normal(0.0, 1.0, n) + np.where(y == 1, 1.5, -1.5)
    p1 = 1.0 / (1.0 + np.exp(-z))
    return y, np.c_[1.0 - p1, p1].astype(np.float32)


def _top(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = p.argmax(axis=1)
    return pred, p[np.arange(len(p)), pred].astype(np.float64)


def _at_or_above(score: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each grid threshold c: (#cases with score >= c, #good among them)."""
    order = np.argsort(score)
    start = np.searchsorted(score[order], grid(), side="left")
    good_above = np.concatenate([np.cumsum(good[order][::-1])[::-1], [0]])
    return len(score) - start, good_above[start]


def _lowest_passing(y, p, k, target) -> float | None:
    """Uncorrected: the lowest grid threshold whose class-k predictions are right at least
    ``target`` of the time on this split."""
    pred, top = _top(p)
    mine = pred == k
    n, good = _at_or_above(top[mine], y[mine] == k)
    ok = (n > 0) & (good >= target * n)
    return float(grid()[np.argmax(ok)]) if ok.any() else None


@pytest.mark.parametrize(("target", "delta"), [(0.95, 0.05), (0.99, 0.1)])
def test_auto_labelled_accuracy_meets_the_target_in_1_minus_delta_of_splits(target, delta):
    rng = np.random.default_rng(7)
    y_pop, p_pop = _three(rng, 400_000)
    pred, top = _top(p_pop)
    right = pred == y_pop

    def realised(cuts: dict) -> tuple[float, dict[str, float]]:
        kept = np.zeros(len(y_pop), dtype=bool)
        per = {}
        for k, name in enumerate(CLASSES):
            if cuts[name] is not None:
                mine = (pred == k) & (top >= cuts[name])
                kept |= mine
                per[name] = right[mine].mean() if mine.any() else 1.0
        return (right[kept].mean() if kept.any() else 1.0), per

    failed = failed_per_class = naive_failed = reached = 0
    auto = []
    for _ in range(SPLITS):
        y, p = _three(rng, int(rng.integers(1000, 2001)))
        naive = {n: _lowest_passing(y, p, k, target) for k, n in enumerate(CLASSES)}
        naive_failed += min(realised(naive)[1].values()) < target
        try:
            plan = label_thresholds(review_statistics("multi-class", y, p, CLASSES), target, delta)
        except UnreachableTarget:
            continue  # nothing auto-labelled: no error made
        reached += 1
        overall, per = realised(plan.thresholds)
        failed += overall < target
        failed_per_class += min(per.values()) < target  # each class: delta/K (Bonferroni)
        auto.append(plan.expected_auto_fraction)
    assert reached >= 0.9 * SPLITS, reached
    assert failed <= delta * SPLITS and failed_per_class <= delta * SPLITS
    assert naive_failed > 2 * delta * SPLITS, naive_failed  # the check can fail
    assert np.mean(auto) > 0.5  # and the guarantee still labels most cases


@pytest.mark.parametrize(
    ("ppv", "npv", "delta"), [(0.9, 0.98, 0.1), (0.9, None, 0.05), (None, 0.98, 0.05)]
)
def test_triage_buckets_meet_ppv_and_npv_in_1_minus_delta_of_splits(ppv, npv, delta):
    rng = np.random.default_rng(11)
    y_pop, p_pop = _binary(rng, 400_000)
    score = p_pop[:, 1].astype(np.float64)

    def fails(urgent_at, routine_below) -> bool:
        bad = False
        if ppv is not None and urgent_at is not None:
            bad |= y_pop[score >= urgent_at].mean() < ppv
        if npv is not None and routine_below is not None:
            bad |= 1 - y_pop[score < routine_below].mean() < npv
        return bool(bad)

    failed = naive_failed = reached = 0
    for _ in range(SPLITS):
        y, p = _binary(rng, int(rng.integers(1000, 2001)))
        stats = review_statistics("binary-class", y, p, BINARY)
        try:
            plan = triage_thresholds(stats, "finding", target_ppv=ppv, target_npv=npv, delta=delta)
        except UnreachableTarget:
            continue
        reached += 1
        failed += fails(plan.urgent_at, plan.routine_below)
        s = p[:, 1].astype(np.float64)
        n_up, pos_up = _at_or_above(s, y == 1)
        n_down, neg_down = len(y) - n_up, (y == 0).sum() - (n_up - pos_up)
        ok_u = (n_up > 0) & (pos_up >= (ppv or 0) * n_up)
        ok_r = (n_down > 0) & (neg_down >= (npv or 0) * n_down)
        naive_u = grid()[np.argmax(ok_u)] if ok_u.any() else None
        naive_r = grid()[len(ok_r) - 1 - np.argmax(ok_r[::-1])] if ok_r.any() else None
        naive_failed += fails(naive_u, naive_r)
    assert reached >= SPLITS // 2, reached
    assert failed <= delta * reached
    assert naive_failed > 2 * delta * reached, naive_failed


def _binom_cdf(k: int, n: int, q: float) -> float:
    """P(Binom(n, q) <= k), summed term by term in log space (no scipy)."""
    terms = (
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * math.log(q)
        + (n - i) * math.log1p(-q)
        for i in range(k + 1)
    )
    return min(1.0, sum(math.exp(t) for t in terms))


def _brute_force(kept_at, order, target, delta):
    """Fixed-sequence testing over raw counts: the last grid index passed, or None."""
    last = None
    for j in order:
        n, errors = kept_at(j)
        if target**n > delta:
            continue
        if _binom_cdf(errors, n, 1 - target) > delta:
            break
        last = j
    return last


def test_thresholds_equal_a_brute_force_count_on_the_raw_cases():
    rng = np.random.default_rng(3)
    y, p = _three(rng, 1500)
    plan = label_thresholds(review_statistics("multi-class", y, p, CLASSES), 0.97, 0.1)
    pred, top = _top(p)
    lam = grid()
    for k, name in enumerate(CLASSES):

        def kept_at(j, k=k):
            mine = (pred == k) & (top >= lam[j])
            return int(mine.sum()), int((y[mine] != k).sum())

        j = _brute_force(kept_at, range(len(lam) - 1, -1, -1), 0.97, 0.1 / 3)
        assert plan.thresholds[name] == (None if j is None else lam[j]), name
        if j is not None:
            n, errors = kept_at(j)
            assert plan.expected_auto_per_class[name] == pytest.approx(n / len(y))
            assert plan.calibration_accuracy[name] == pytest.approx(1 - errors / n)
    assert plan.thresholds["common"] is not None and plan.expected_auto_fraction > 0.5

    y, p = _binary(rng, 1200)
    stats = review_statistics("binary-class", y, p, BINARY)
    plan_t = triage_thresholds(stats, "finding", target_ppv=0.85, target_npv=0.97, delta=0.1)
    s = p[:, 1].astype(np.float64)
    ju = _brute_force(
        lambda j: (int((s >= lam[j]).sum()), int((y[s >= lam[j]] == 0).sum())),
        range(len(lam) - 1, -1, -1),
        0.85,
        0.05,
    )
    jr = _brute_force(
        lambda j: (int((s < lam[j]).sum()), int((y[s < lam[j]] == 1).sum())),
        range(len(lam)),
        0.97,
        0.05,
    )
    assert ju is not None and jr is not None and jr <= ju
    assert (plan_t.urgent_at, plan_t.routine_below) == (lam[ju], lam[jr])
    assert plan_t.expected_urgent == pytest.approx((s >= lam[ju]).mean())
    assert plan_t.calibration_npv == pytest.approx(1 - y[s < lam[jr]].mean())


def test_an_unreachable_target_names_the_most_that_can_be_guaranteed():
    rng = np.random.default_rng(5)
    y, p = _binary(rng, 600)
    stats = review_statistics("binary-class", y, p, BINARY)
    with pytest.raises(UnreachableTarget, match="calibration cases") as info:
        label_thresholds(stats, 0.999, 0.05)
    best = info.value.best
    assert 0.8 < best < 0.999 and f"{best:.4f}" in str(info.value)
    assert isinstance(info.value, ConfigError)
    plan = label_thresholds(stats, best, 0.05)  # the best is reachable, a little more is not
    assert any(c is not None for c in plan.thresholds.values())
    assert max(plan.best_per_class.values()) == best
    with pytest.raises(UnreachableTarget):
        label_thresholds(stats, best + 0.002, 0.05)

    with pytest.raises(UnreachableTarget, match=r"target PPV 0\.999 for finding") as info:
        triage_thresholds(stats, "finding", target_ppv=0.999, target_npv=None, delta=0.05)
    best = info.value.best
    plan_t = triage_thresholds(stats, "finding", target_ppv=best, target_npv=None, delta=0.05)
    assert plan_t.urgent_at is not None and plan_t.routine_below is None
    with pytest.raises(UnreachableTarget, match="target NPV"):
        triage_thresholds(stats, "finding", target_ppv=None, target_npv=0.9999, delta=0.05)


def test_statistics_round_trip_through_json_and_the_model_spec_and_stay_small():
    rng = np.random.default_rng(9)
    y, p = _binary(rng, 2000)
    stats = review_statistics("binary-class", y[:, None], p, BINARY)  # MedMNIST (N, 1) labels
    assert (stats["format"], stats["split"], stats["n"]) == (1, "val", 2000)
    assert json.loads(json.dumps(stats)) == stats and len(json.dumps(stats)) < 5_000
    spec = ModelSpec("x", "binary-class", BINARY, 28, 1, positive_class="finding")
    again = ModelSpec.from_json(spec.with_fields(review=stats).to_json()).review
    assert again == stats
    assert label_thresholds(again, 0.95, 0.05) == label_thresholds(stats, 0.95, 0.05)

    names = tuple(f"class{i}" for i in range(11))
    y = rng.integers(0, 11, 5000)
    z = rng.normal(0, 1, (5000, 11))
    z[np.arange(5000), y] += 3
    assert len(json.dumps(review_statistics("multi-class", y, _softmax(z), names))) < 50_000


def test_a_rare_class_gets_its_own_threshold_not_the_common_ones():
    """One threshold for all classes, set by the overall accuracy, labels the rare class far
    below the target; per predicted class, it is held to the target too."""
    rng = np.random.default_rng(13)
    y_pop, p_pop = _three(rng, 300_000, signal=(3.0, 3.0, 0.0), easy_rare=True)
    pred, top = _top(p_pop)
    right = pred == y_pop
    target = 0.9
    one = next(c for c in grid() if right[top >= c].mean() >= target)
    assert right[(pred == 2) & (top >= one)].mean() < target - 0.1  # swallowed

    y, p = _three(rng, 2000, signal=(3.0, 3.0, 0.0), easy_rare=True)
    plan = label_thresholds(review_statistics("multi-class", y, p, CLASSES), target, 0.1)
    rare, common = plan.thresholds["rare"], plan.thresholds["common"]
    assert rare is not None and common is not None and rare > common
    assert right[(pred == 2) & (top >= rare)].mean() >= target
    assert plan.expected_auto_per_class["rare"] > 0


def test_review_decisions_at_the_thresholds():
    rng = np.random.default_rng(17)
    y, p = _binary(rng, 1500)
    plan = label_thresholds(review_statistics("binary-class", y, p, BINARY), 0.95, 0.05)
    cut = plan.thresholds["finding"]
    assert cut is not None
    assert not plan.needs_review("finding", cut) and plan.needs_review("finding", cut - 1e-9)
    assert plan.needs_review("unknown", 1.0)
    t = triage_thresholds(
        review_statistics("binary-class", y, p, BINARY),
        "finding",
        target_ppv=0.9,
        target_npv=0.97,
        delta=0.05,
    )
    assert t.urgent_at is not None and t.routine_below is not None
    assert t.bucket(t.urgent_at) == "urgent" and t.bucket(t.routine_below) == "uncertain"
    assert t.bucket(t.routine_below - 1e-9) == "routine"


def test_multi_label_and_bad_inputs_are_refused():
    y = np.zeros((10, 3), dtype=int)
    with pytest.raises(ConfigError, match="single-label tasks only"):
        review_statistics("multi-label, binary-class", y, np.full((10, 3), 0.5), CLASSES)
    rng = np.random.default_rng(1)
    y, p = _binary(rng, 300)
    stats = review_statistics("binary-class", y, p, BINARY)
    for target, delta in [(1.0, 0.05), (0.9, 0.0), (0.0, 0.1)]:
        with pytest.raises(ConfigError, match="strictly between 0 and 1"):
            label_thresholds(stats, target, delta)
    with pytest.raises(ConfigError, match="format 99"):
        label_thresholds({**stats, "format": 99}, 0.9, 0.1)
    with pytest.raises(ConfigError, match="single-label"):
        label_thresholds({**stats, "task": "multi-label, binary-class"}, 0.9, 0.1)
    with pytest.raises(ConfigError, match="'pneumonia' is not one of"):
        triage_thresholds(stats, "pneumonia", target_ppv=0.9, target_npv=None, delta=0.1)
    with pytest.raises(ConfigError, match="labels outside"):
        review_statistics("binary-class", y + 1, p, BINARY)


def test_the_commands_refuse_multi_label_models_and_stray_flags(tmp_path, capsys):
    """What ``medimg label`` and ``triage`` check before connecting, or from the served
    model's contract before any image is sent."""
    from serving.cli import main
    from serving.cli.guarantee import model_review_statistics as _review_statistics
    from serving.clients.contract import ModelContract

    spec = ModelSpec("chestxray14", "multi-label, binary-class", ("effusion", "edema"), 32, 1)
    contract = ModelContract("cxr", "cxr_onnx", spec, max_batch_size=8, accepts_bytes=True)
    with pytest.raises(ConfigError, match=r"'cxr' is multi-label.*single-label tasks only"):
        _review_statistics(contract, "--target-ppv 0.9", "drop the target")
    out = str(tmp_path / "out.csv")
    for argv, message in [
        (["label", "x.png", "--out", out, "--delta", "0.1"], "--delta: goes with"),
        (["label", "x.png", "--out", out, "--target-accuracy", "1"], "strictly between"),
        (["triage", "x.png", "--target-ppv", "0.9", "--delta", "2"], "--delta: expected"),
    ]:
        assert main(argv) == 1
        assert message in capsys.readouterr().err
