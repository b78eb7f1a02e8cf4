"""Subgroup audit of a classifier's test-split predictions: pure computation, no I/O.

Per cohort -- one value of an attribute (sex ``F``, age band ``40-59``, view ``AP``) -- and
per intersection of attributes (``F × 40-59``): n, patients, prevalence, AUROC,
sensitivity and specificity at the operating threshold, ECE and, for multi-label chest
X-ray, the underdiagnosis rate (images with any finding predicted "No Finding": no finding
at or above its threshold; Seyyed-Kalantari et al., Nature Medicine 27, 2176-2182, 2021).

- Binary: metrics of the finding (``positive_index``) at its threshold. Multi-class: macro
  one-vs-rest AUROC, macro sensitivity/specificity of the arg-max. Multi-label: macro over
  the findings present, each at its own threshold. Thresholds missing: 0.5 (said so).
- ECE: 15 equal-width bins of the top-label confidence (multi-label: the mean over labels
  of each label's binary top-label ECE).
- 95% CIs: percentile bootstrap over PATIENTS (all images of a patient drawn together; one
  draw of the whole test set per resample, so a cohort and its reference share it).
- Cohorts with fewer than ``min_cases`` images are censored (n only), as seismometer does.
- Each metric's ratio to the largest cohort of the same attribute (or intersection), in
  seismometer's bands (``get_fairness_icon``, limit 0.25): fine within [1/1.25, 1.25] =
  [0.8, 1.25], flagged within [1/1.5, 1.5], critical beyond::

    python -c "import numpy as np; from training.audit import audit; r = np.random.default_rng(0); \
y = (r.random(400) < .3).astype(int)[:, None]; p = np.clip(.4 * y + .6 * r.random((400, 1)), 0, 1); \
print(audit('binary-class', y, np.c_[1 - p, p], {'sex': r.choice(['F', 'M'], 400)}).rows[1])"
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from training.errors import ConfigError, DataError
from training.metrics import Estimate, _estimate, _weighted_auc, _weights, task_kind

MIN_CASES = 10  # seismometer's censor_threshold
LIMIT = 0.25  # seismometer's fairness_ratio: fine within 1/(1+L)..1+L, critical beyond 2L
N_BINS = 15
SEP = " × "
ALL = "all"
ONE_CLASS = "n/a (one class)"
METRICS = {  # name: (label, why undefined in a cohort)
    "prevalence": ("Prevalence", ""),
    "auroc": ("AUROC", ONE_CLASS),
    "sensitivity": ("Sensitivity", "n/a (no positive case)"),
    "specificity": ("Specificity", "n/a (no negative case)"),
    "ece": ("ECE", ""),
    "underdiagnosis": ("Underdiagnosis rate", "n/a (no image with a finding)"),
}
_CHUNK = 4_000_000  # resamples x images held in memory at once


@dataclass(frozen=True)
class CohortRow:
    attribute: str  # "all", "sex" or "sex × age_band"
    value: str  # "all", "F" or "F × 40-59"
    n: int  # images
    patients: int
    positives: int | None  # images with the finding (binary) / any finding (multi-label)
    censored: bool = False
    reference: bool = False  # the largest cohort of its attribute: ratios are against it
    metrics: dict[str, Estimate] = field(default_factory=dict)
    ratios: dict[str, Estimate] = field(default_factory=dict)
    bands: dict[str, str] = field(default_factory=dict)  # fine | flagged | critical | n/a ...


@dataclass
class AuditResult:
    task: str
    kind: str  # binary | multi-class | multi-label
    metrics: tuple[str, ...]
    rows: list[CohortRow]
    thresholds: tuple[float, ...]
    threshold_source: str
    n_images: int
    n_patients: int
    n_boot: int
    ci: float
    seed: int
    min_cases: int
    limit: float

    def band_edges(self) -> tuple[float, float, float, float]:
        """(critical below, flagged below, flagged above, critical above)."""
        return 1 / (1 + 2 * self.limit), 1 / (1 + self.limit), 1 + self.limit, 1 + 2 * self.limit

    def to_dict(self) -> dict:
        """JSON-serialisable (NaN -> null)."""
        return json.loads(json.dumps(asdict(self)), parse_constant=lambda _: None)


def band(ratio: float, limit: float = LIMIT) -> str:
    """seismometer's bands of a ratio to the reference cohort: "fine" within
    [1/(1+L), 1+L], "flagged" within [1/(1+2L), 1+2L], else "critical"; "n/a" if undefined."""
    if ratio is None or not math.isfinite(ratio):
        return "n/a"
    if ratio > 1 + 2 * limit or ratio < 1 / (1 + 2 * limit):
        return "critical"
    if ratio > 1 + limit or ratio < 1 / (1 + limit):
        return "flagged"
    return "fine"


def metric_names(kind: str) -> tuple[str, ...]:
    """The metrics of a task kind, in the report's order."""
    drop = {"multi-class": {"prevalence", "underdiagnosis"}, "binary": {"underdiagnosis"}}
    return tuple(m for m in METRICS if m not in drop.get(kind, set()))


@dataclass(frozen=True)
class _Prepared:
    kind: str
    truth: np.ndarray  # (N, K) bool, one column per positive class
    scores: np.ndarray  # (N, K)
    pred: np.ndarray  # (N, K) bool at the operating point
    ece: np.ndarray  # (N, L * N_BINS): confidence - correct, in the column of its bin


def _prepare(task: str, labels, probs, thresholds, positive_index: int):
    kind = task_kind(task)
    labels = np.asarray(labels).reshape(len(labels), -1)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
    if not len(labels) or len(labels) != len(probs):
        raise DataError(f"audit: labels {labels.shape} but predictions {probs.shape}")
    if kind == "multi-label":
        if labels.shape != probs.shape:
            raise DataError(f"audit: labels {labels.shape} but predictions {probs.shape}")
        truth, scores = labels == 1, probs
    elif kind == "binary":
        if not 0 <= positive_index < probs.shape[1]:
            raise DataError(f"audit: positive index {positive_index} of {probs.shape[1]} columns")
        truth, scores = (labels[:, :1] == positive_index), probs[:, [positive_index]]
    else:
        truth, scores = labels[:, :1] == np.arange(probs.shape[1]), probs
    t = tuple(float(x) for x in thresholds)
    if kind == "multi-class":
        t, source = (), "the arg-max (multi-class: no threshold)"
    elif not t:
        t = (0.5,) * truth.shape[1]
        source = (
            "0.5: this model version's spec has no operating thresholds "
            "(it was trained before they were recorded)"
        )
    elif len(t) != truth.shape[1]:
        raise ConfigError(f"audit: {len(t)} threshold(s) for {truth.shape[1]} {kind} column(s)")
    else:
        source = "the model spec (chosen on the validation split)"
    if kind == "multi-class":
        pred = probs.argmax(1)[:, None] == np.arange(probs.shape[1])
        conf = probs.max(1)[:, None]
        correct = (probs.argmax(1) == labels[:, 0])[:, None]
    else:
        pred = scores >= np.asarray(t)
        conf, correct = np.maximum(scores, 1 - scores), (scores >= 0.5) == truth
    bins = np.minimum((conf * N_BINS).astype(int), N_BINS - 1) + N_BINS * np.arange(conf.shape[1])
    ece = np.zeros((len(conf), conf.shape[1] * N_BINS))
    np.put_along_axis(ece, bins, conf - correct, axis=1)
    return _Prepared(kind, truth, scores, pred, ece), t, source


def _values(prep: _Prepared, idx: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of the images ``idx`` for each row of image weights ``w`` (R, len(idx))."""
    truth, pred, scores = prep.truth[idx], prep.pred[idx], prep.scores[idx]
    total = w.sum(1, dtype=np.float64)
    tp, fn = w @ (truth & pred), w @ (truth & ~pred)
    tn, fp = w @ (~truth & ~pred), w @ (~truth & pred)
    auc = np.stack([_weighted_auc(w, y, s) for y, s in zip(truth.T, scores.T, strict=True)], 1)
    gaps = np.abs((w @ prep.ece[idx]).reshape(len(w), -1, N_BINS)).sum(2)  # (R, L)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN: NaN
        out = {
            "prevalence": (w @ truth.any(1)) / total,
            "auroc": np.nanmean(auc, 1),
            "sensitivity": np.nanmean(tp / (tp + fn), 1),
            "specificity": np.nanmean(tn / (tn + fp), 1),
            "ece": (gaps / total[:, None]).mean(1),
        }
        if prep.kind == "multi-label":
            ill = truth.any(1)
            out["underdiagnosis"] = (w @ (ill & ~pred.any(1))) / (w @ ill)
    if prep.kind == "multi-class":
        del out["prevalence"]
    return out


@dataclass
class _Cohort:
    attribute: str
    value: str
    idx: np.ndarray
    point: dict[str, float] = field(default_factory=dict)
    reps: dict[str, list[np.ndarray]] = field(default_factory=dict)


def _cohorts(columns: Mapping[str, np.ndarray], by: Sequence[str], order: int) -> list[_Cohort]:
    """The cohorts of each attribute in ``by`` and of each combination of 2..order of them."""
    out = [_Cohort(ALL, ALL, np.arange(len(next(iter(columns.values())))))]
    for k in range(1, order + 1):
        for names in itertools.combinations(by, k):
            keys = np.array([SEP.join(v) for v in zip(*(columns[n] for n in names), strict=True)])
            for value in sorted(set(keys.tolist())):
                out.append(_Cohort(SEP.join(names), value, np.flatnonzero(keys == value)))
    return out


def _estimate_of(value: float, reps: np.ndarray, ci: float, why: str) -> Estimate:
    if not math.isfinite(value):
        return Estimate(float("nan"), float("nan"), float("nan"), 0, why or "n/a")
    return _estimate(value, reps, ci)


def audit(
    task: str,
    labels: np.ndarray,
    probs: np.ndarray,
    cohorts: Mapping[str, Sequence[str] | np.ndarray],
    *,
    patients: Sequence[str] | np.ndarray | None = None,
    thresholds: Sequence[float] = (),
    positive_index: int = 1,
    by: Sequence[str] = (),
    intersections: str = "pairs",
    min_cases: int = MIN_CASES,
    limit: float = LIMIT,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> AuditResult:
    """The audit of ``probs`` (calibrated, (N, K)) against ``labels`` ((N, 1) class indices
    or (N, K) 0/1) per value of each ``cohorts`` column named in ``by`` (default: all) and per
    intersection ("pairs": of two attributes, "all": of 2..len(by), "none"). ``patients``:
    one id per image (default: every image its own patient)."""
    if n_boot < 0 or not 0 < ci < 1 or limit <= 0 or min_cases < 1:
        raise ConfigError(
            f"audit: n_boot {n_boot} >= 0, ci {ci} in (0, 1), limit {limit} > 0 and "
            f"min_cases {min_cases} >= 1 expected"
        )
    orders = {"none": 1, "pairs": 2, "all": max(2, len(by or cohorts))}
    if intersections not in orders:
        raise ConfigError(f"audit: intersections {intersections!r}: use {' | '.join(orders)}")
    prep, t, source = _prepare(task, labels, probs, thresholds, positive_index)
    n = len(prep.truth)
    by = list(dict.fromkeys(by or cohorts))
    if not by:
        raise ConfigError("audit: no cohort column to audit by")
    unknown = [b for b in by if b not in cohorts]
    if unknown:
        raise ConfigError(f"audit: no cohort column {unknown}; available: {sorted(cohorts)}")
    columns = {b: np.asarray(cohorts[b]).astype(str) for b in by}
    bad = [b for b, c in columns.items() if len(c) != n]
    if bad:
        raise DataError(f"audit: cohort column(s) {bad} do not have one value per image ({n})")
    ids = np.arange(n) if patients is None else np.asarray(patients).astype(str)
    if len(ids) != n:
        raise DataError(f"audit: {len(ids)} patient ids for {n} images")
    _, pidx = np.unique(ids, return_inverse=True)
    n_patients = int(pidx.max()) + 1

    groups = _cohorts(columns, by, min(orders[intersections], len(by)))
    live = [g for g in groups if len(g.idx) >= min_cases]
    for g in live:
        g.point = {
            m: float(v[0]) for m, v in _values(prep, g.idx, np.ones((1, len(g.idx)))).items()
        }
    rng, step = np.random.default_rng(seed), max(1, _CHUNK // n)
    for start in range(0, n_boot, step):
        drawn = _weights(n_patients, min(step, n_boot - start), rng)  # (R, patients)
        w = drawn[:, pidx]  # each image weighs as often as its patient was drawn
        for g in live:
            for m, values in _values(prep, g.idx, w[:, g.idx]).items():
                g.reps.setdefault(m, []).append(values)
    metrics = metric_names(prep.kind)
    empty = np.empty(0)
    reps = {id(g): {m: np.concatenate(g.reps.get(m, [empty])) for m in metrics} for g in live}

    def ref_of(attribute: str) -> _Cohort | None:
        members = [g for g in groups if g.attribute == attribute]
        best = max(members, key=lambda g: len(g.idx))  # first of the largest, by value order
        return best if len(best.idx) >= min_cases else None

    refs = {a: ref_of(a) for a in dict.fromkeys(g.attribute for g in groups)}
    singles = {a for a in refs if sum(g.attribute == a for g in groups) == 1}
    rows = []
    for g in groups:
        positives = None if prep.kind == "multi-class" else int(prep.truth[g.idx].any(1).sum())
        head = (g.attribute, g.value, len(g.idx), len(np.unique(pidx[g.idx])), positives)
        if len(g.idx) < min_cases:
            rows.append(CohortRow(*head, censored=True, bands=dict.fromkeys(metrics, "censored")))
            continue
        r = reps[id(g)]
        est = {m: _estimate_of(g.point[m], r[m], ci, METRICS[m][1]) for m in metrics}
        ref = refs[g.attribute]
        ratios, bands = {}, {}
        for m in () if g.attribute == ALL else metrics:
            if m == "prevalence":
                continue  # a property of the data, not of the model: shown, not rated
            if g.attribute in singles:
                bands[m] = ONE_CLASS  # an attribute with one value: nothing to compare
            elif not math.isfinite(g.point[m]):
                bands[m] = METRICS[m][1] or "n/a"
            elif ref is None:
                bands[m] = "n/a (reference censored)"
            elif g is ref:
                bands[m] = "reference"
            elif not (math.isfinite(ref.point[m]) and ref.point[m]):
                bands[m] = "n/a (reference undefined or 0)"
            else:
                with np.errstate(invalid="ignore", divide="ignore"):
                    reps_ratio = r[m] / reps[id(ref)][m]
                ratios[m] = _estimate(g.point[m] / ref.point[m], reps_ratio, ci)
                bands[m] = band(ratios[m].value, limit)
        is_ref = g is ref and g.attribute != ALL
        rows.append(CohortRow(*head, reference=is_ref, metrics=est, ratios=ratios, bands=bands))
    return AuditResult(
        task, prep.kind, metrics, rows, t, source, n, n_patients, n_boot, ci, seed, min_cases, limit
    )
