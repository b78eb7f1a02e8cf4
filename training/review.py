"""Review thresholds with a statistical guarantee (Learn then Test, Angelopoulos et al. 2021)
for ``medimg label --target-accuracy`` and ``medimg triage --target-ppv/--target-npv``.

:func:`review_statistics` turns the calibrated probabilities of the validation split into
small JSON-able sufficient statistics (stored in the model spec, ``ModelSpec.review``), so
thresholds for any target and delta are chosen later without the data:
:func:`label_thresholds` (one per PREDICTED class) and :func:`triage_thresholds` (urgent and
routine cut-offs on P(finding))::

    python -c "import numpy as np; from training.review import review_statistics as rs, label_thresholds as lt; \
r = np.random.default_rng(0); y = r.integers(0, 2, 2000); p = 1 / (1 + np.exp(2 - 4 * y - r.normal(0, 1.5, 2000))); \
print(lt(rs('binary-class', y, np.c_[1 - p, p], ('normal', 'pneumonia')), 0.95, 0.05))"

Method. Candidate thresholds are a FIXED grid (uniform in logit, so fine near 0 and 1; not
taken from the data). For a threshold l the hypothesis "the accuracy of the cases it keeps
is below the target t" gets the p-value P(Binom(n_l, 1 - t) <= errors_l), n_l cases kept
(exact, conditionally on n_l). Fixed-sequence testing from the strictest threshold down
stops at the first non-rejection and keeps the last rejected one. Thresholds keeping so few
cases that even none wrong would not be evidence (t ** n_l > delta) are skipped, not tested:
a fixed rule, exact when being right is no less likely at higher scores (what thresholding
assumes). Labelling tests each predicted class at delta / K (Bonferroni), so all K hold
jointly, hence the auto-labelled set as a whole; triage with both targets tests each
bucket at delta / 2. If new images are exchangeable with the calibration split, then with
probability >= 1 - delta the EXPECTED accuracy (PPV, NPV) of the kept cases is >= target.

Statistics (``format`` 1): ``n``, ``split`` ("val"), ``task``, ``class_names``, the grid
(``logit_min``, ``logit_max``, ``points``) and per class four histograms over bins
b = #(grid points <= p_k), each ``{"from": b0, "counts": [...]}``: ``predicted_right`` and
``predicted_wrong`` (cases predicted k), ``positive`` and ``negative`` (true class k or not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta, binom  # type: ignore[import-untyped]

from training.errors import ConfigError

FORMAT = 1
GRID = {"logit_min": -14.0, "logit_max": 14.0, "points": 281}  # step 0.1 in logit
HISTOGRAMS = ("predicted_right", "predicted_wrong", "positive", "negative")
HELP = "a lower target, a larger delta, or more calibration cases (a larger validation split)"


class UnreachableTarget(ConfigError):
    """No threshold can guarantee the target at this delta; ``best`` is the most that can."""

    def __init__(self, message: str, best: float) -> None:
        super().__init__(message)
        self.best = best


@dataclass(frozen=True)
class LabelThresholds:
    """Auto-label a case predicted k when P(k) >= ``thresholds[k]`` (None: always review)."""

    target: float
    delta: float
    delta_per_class: float
    thresholds: dict[str, float | None]
    expected_auto_fraction: float  # of the calibration cases, auto-labelled
    expected_auto_per_class: dict[str, float]  # of all calibration cases, auto-labelled as k
    calibration_accuracy: dict[str, float | None]  # of the auto-labelled calibration cases
    best_per_class: dict[str, float]  # the highest target guaranteed at delta_per_class
    n: int
    split: str

    def needs_review(self, label: str, probability: float) -> bool:
        cut = self.thresholds.get(label)
        return cut is None or not probability >= cut


@dataclass(frozen=True)
class TriageThresholds:
    """urgent: P(finding) >= ``urgent_at``; routine: P(finding) < ``routine_below``."""

    finding: str
    delta: float
    target_ppv: float | None
    target_npv: float | None
    urgent_at: float | None  # None: no urgent bucket (no PPV target)
    routine_below: float | None  # None: no routine bucket (no NPV target, or none passed)
    expected_urgent: float  # fractions of the calibration cases
    expected_routine: float
    calibration_ppv: float | None
    calibration_npv: float | None
    n: int
    split: str

    def bucket(self, probability: float) -> str:
        if self.urgent_at is not None and probability >= self.urgent_at:
            return "urgent"
        if self.routine_below is not None and probability < self.routine_below:
            return "routine"
        return "uncertain"


def grid(stats: dict | None = None) -> np.ndarray:
    """The candidate thresholds, ascending (float64)."""
    g = (stats or {}).get("grid", GRID)
    z = np.linspace(float(g["logit_min"]), float(g["logit_max"]), int(g["points"]))
    return 1.0 / (1.0 + np.exp(-z))


def review_statistics(
    task: str, labels: np.ndarray, probs: np.ndarray, class_names: tuple[str, ...]
) -> dict:
    """Sufficient statistics of the calibration (validation) split's calibrated
    probabilities ``probs`` (N, K) and class indices ``labels`` (N or N x 1)."""
    if task.startswith("multi-label"):
        raise ConfigError("review statistics: the guarantee is for single-label tasks only")
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).reshape(-1).astype(int)
    k = len(class_names)
    if p.ndim != 2 or p.shape[1] != k or len(y) != len(p) or not len(y):
        raise ConfigError(f"review statistics: probs {p.shape}, labels {y.shape}, {k} classes")
    if y.min() < 0 or y.max() >= k:
        raise ConfigError(f"review statistics: labels outside 0..{k - 1}")
    bins = np.searchsorted(grid(), p, side="right")  # p >= grid[j]  <=>  bin > j
    pred = p.argmax(axis=1)
    classes = {}
    for c, name in enumerate(class_names):
        mine, true = pred == c, y == c
        cases = {
            "predicted_right": mine & true,
            "predicted_wrong": mine & ~true,
            "positive": true,
            "negative": ~true,
        }
        classes[name] = {h: _histogram(bins[m, c]) for h, m in cases.items()}
    return {
        "format": FORMAT,
        "method": "learn-then-test",
        "split": "val",
        "n": len(y),
        "task": task,
        "class_names": list(class_names),
        "grid": dict(GRID),
        "classes": classes,
    }


def label_thresholds(stats: dict, target: float, delta: float) -> LabelThresholds:
    """Per predicted class, the lowest threshold whose auto-labelled cases have accuracy
    >= ``target`` with probability >= 1 - ``delta`` (jointly: delta / K per class)."""
    _check(target, "target accuracy")
    _check(delta, "delta")
    names, n, lam = _read(stats)
    per = delta / len(names)
    cuts: dict[str, float | None] = {}
    auto: dict[str, float] = {}
    accuracy: dict[str, float | None] = {}
    best: dict[str, float] = {}
    for name in names:
        right, wrong = (_dense(stats, name, h) for h in HISTOGRAMS[:2])
        kept, errors = _at_least(right + wrong), _at_least(wrong)
        order = np.arange(len(lam))[::-1]  # strictest first
        passed = _fixed_sequence(kept, errors, order, target, per)
        best[name] = _best(kept, errors, order, per)
        j = passed[-1] if passed else None
        cuts[name] = None if j is None else float(lam[j])
        auto[name] = 0.0 if j is None else int(kept[j]) / n
        accuracy[name] = None if j is None else 1.0 - int(errors[j]) / int(kept[j])
    if all(c is None for c in cuts.values()):
        top = max(best.values())
        each = ", ".join(f"{k} {_most(v)}" for k, v in best.items())
        raise UnreachableTarget(
            f"target accuracy {target:g} cannot be guaranteed at delta {delta:g} with {n} "
            f"calibration cases ({stats.get('split', 'val')} split): the highest that can is "
            f"{_most(top)} (per predicted class, at delta/{len(names)}: {each}); {HELP} would help",
            top,
        )
    return LabelThresholds(
        target=target,
        delta=delta,
        delta_per_class=per,
        thresholds=cuts,
        expected_auto_fraction=sum(auto.values()),
        expected_auto_per_class=auto,
        calibration_accuracy=accuracy,
        best_per_class=best,
        n=n,
        split=str(stats.get("split", "val")),
    )


def triage_thresholds(
    stats: dict,
    finding: str,
    *,
    target_ppv: float | None,
    target_npv: float | None,
    delta: float,
) -> TriageThresholds:
    """Cut-offs on P(``finding``): urgent cases with PPV >= ``target_ppv``, routine ones
    with NPV >= ``target_npv``, each with probability >= 1 - delta (jointly: delta / 2 per
    bucket when both are given); the rest uncertain."""
    targets = {"PPV": target_ppv, "NPV": target_npv}
    given = {k: t for k, t in targets.items() if t is not None}
    if not given:
        raise ConfigError("triage thresholds: give a target PPV, a target NPV or both")
    for what, t in given.items():
        _check(t, f"target {what}")
    _check(delta, "delta")
    names, n, lam = _read(stats)
    if finding not in names:
        raise ConfigError(f"triage thresholds: {finding!r} is not one of {names}")
    per = delta / len(given)
    pos, neg = (_dense(stats, finding, h) for h in HISTOGRAMS[2:])
    up, fp = _at_least(pos + neg), _at_least(neg)  # index j: P >= grid[j]
    down, fn = np.cumsum(pos + neg)[:-1], np.cumsum(pos)[:-1]  # index j: P < grid[j]
    urgent: list[int] = []
    routine: list[int] = []
    if target_ppv is not None:
        urgent = _fixed_sequence(up, fp, np.arange(len(lam))[::-1], target_ppv, per)
    if target_npv is not None:
        routine = _fixed_sequence(down, fn, np.arange(len(lam)), target_npv, per)
    if urgent:  # a routine bucket reaching into the urgent one: its passed cut at or below it
        routine = [j for j in routine if j <= urgent[-1]]
    for what, passed, kept, errors, order in (
        ("PPV", urgent, up, fp, np.arange(len(lam))[::-1]),
        ("NPV", routine, down, fn, np.arange(len(lam))),
    ):
        goal = targets[what]
        if goal is not None and not passed:
            top = _best(kept, errors, order, per)
            split = f" (at delta/{len(given)})" if len(given) > 1 else ""
            raise UnreachableTarget(
                f"target {what} {goal:g} for {finding} cannot be guaranteed at delta {delta:g} "
                f"with {n} calibration cases ({stats.get('split', 'val')} split): the highest "
                f"that can is {_most(top)}{split}; {HELP} would help",
                top,
            )
    ju, jr = (urgent[-1] if urgent else None), (routine[-1] if routine else None)
    return TriageThresholds(
        finding=finding,
        delta=delta,
        target_ppv=target_ppv,
        target_npv=target_npv,
        urgent_at=None if ju is None else float(lam[ju]),
        routine_below=None if jr is None else float(lam[jr]),
        expected_urgent=0.0 if ju is None else int(up[ju]) / n,
        expected_routine=0.0 if jr is None else int(down[jr]) / n,
        calibration_ppv=None if ju is None else 1.0 - int(fp[ju]) / int(up[ju]),
        calibration_npv=None if jr is None else 1.0 - int(fn[jr]) / int(down[jr]),
        n=n,
        split=str(stats.get("split", "val")),
    )


def _most(best: float) -> str:
    return f"{best:.4f}" if best > 0 else "none"


def _check(value: float, what: str) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{what}: expected a probability strictly between 0 and 1, got {value}")


def _histogram(bins: np.ndarray) -> dict:
    if not len(bins):
        return {"from": 0, "counts": []}
    lo = int(bins.min())
    return {"from": lo, "counts": [int(c) for c in np.bincount(bins - lo)]}


def _read(stats: dict) -> tuple[list[str], int, np.ndarray]:
    """(class names, n, grid) of ``stats``, after checking its format."""
    if not stats:
        raise ConfigError("review statistics: none (the model was trained before they were kept)")
    if stats.get("format") != FORMAT:
        raise ConfigError(
            f"review statistics: format {stats.get('format')!r}; this medimg reads format "
            f"{FORMAT} (upgrade medimg, or retrain and re-export the model)"
        )
    if str(stats.get("task", "")).startswith("multi-label"):
        raise ConfigError("review thresholds: the guarantee is for single-label tasks only")
    return list(stats["class_names"]), int(stats["n"]), grid(stats)


def _dense(stats: dict, name: str, which: str) -> np.ndarray:
    """Histogram ``which`` of class ``name`` over all len(grid) + 1 bins."""
    h = stats["classes"][name][which]
    out = np.zeros(int(stats["grid"]["points"]) + 1, dtype=np.int64)
    counts = np.asarray(h["counts"], dtype=np.int64)
    out[int(h["from"]) : int(h["from"]) + len(counts)] = counts
    return out


def _at_least(hist: np.ndarray) -> np.ndarray:
    """Index j: the cases with P >= grid[j] (bins j + 1 and up)."""
    return np.cumsum(hist[::-1])[::-1][1:]


def _fixed_sequence(
    kept: np.ndarray, errors: np.ndarray, order: np.ndarray, target: float, delta: float
) -> list[int]:
    """The thresholds (indices, in ``order``) rejected by fixed-sequence testing of
    "accuracy of the kept cases < target" at level ``delta``."""
    kept, errors = kept[order], errors[order]
    pvalues = binom.cdf(errors, kept, 1.0 - target)
    testable = target ** kept.astype(np.float64) <= delta  # else none wrong is no evidence
    passed: list[int] = []
    for i in np.flatnonzero(testable):
        if pvalues[i] > delta:
            break
        passed.append(int(order[i]))
    return passed


def _best(kept: np.ndarray, errors: np.ndarray, order: np.ndarray, delta: float) -> float:
    """The highest target :func:`_fixed_sequence` passes at least one threshold for (to 4
    decimals, rounded down): the first threshold tested for target t is the first keeping
    n >= log(delta) / log(t) cases; it passes iff t <= its Clopper-Pearson lower bound."""
    kept, errors = kept[order].astype(np.float64), errors[order].astype(np.float64)
    before = np.concatenate([[0.0], np.maximum.accumulate(kept)[:-1]])  # kept by stricter ones
    first = (kept > before) & (errors < kept)  # the first to keep this many, not all wrong
    if not first.any():
        return 0.0
    n, e, m = kept[first], errors[first], before[first]
    bound = 1.0 - beta.ppf(1.0 - delta, e + 1, n - e)
    with np.errstate(divide="ignore"):
        floor = np.where(m > 0, delta ** (1.0 / np.maximum(m, 1)), 0.0)
    ok = bound > floor
    return math.floor(float(bound[ok].max()) * 1e4) / 1e4 if ok.any() else 0.0
