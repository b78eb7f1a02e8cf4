"""Temperature scaling fitted on the validation split, and calibration metrics on test.

:func:`fit_temperature`: the temperature(s) minimising the NLL of the VALIDATION logits
(softmax tasks: one, cross-entropy; multi-label: one per label, binary cross-entropy).
:func:`calibration_metrics`: top-label ECE (equal-width and equal-mass bins), class-wise
ECE, Brier score and NLL, each with a percentile bootstrap CI over resampled cases.
:func:`calibrate`: both, on val then on the TEST split, as a :class:`CalibrationReport`::

    python -c "import numpy as np; from training.calibration import calibrate; \
r = np.random.default_rng(0); z = r.normal(0, 2, (4000, 3)); y = (z + r.gumbel(size=z.shape)).argmax(1)[:, None]; \
t, rep = calibrate('multi-class', 3 * z[:2000], y[:2000], 3 * z[2000:], y[2000:]); print(t); print(rep.to_markdown())"

Probabilities are those of :func:`training.model.probabilities` (float32, what the served
model returns); the fit itself minimises the NLL in float64. Dividing logits by T > 0
keeps each image's class order (ACC unchanged) and, for binary and multi-label tasks, the
order of P(finding) across images (AUROC unchanged, up to ties that float32 rounding
makes or breaks near 1: ~1e-5). For multi-class tasks one T can reorder a class's
one-vs-rest scores ACROSS images (its share depends on the other logits), so macro
one-vs-rest AUROC can move a little.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy.optimize import minimize_scalar  # type: ignore[import-untyped]

from training.errors import ConfigError, DataError
from training.metrics import _CHUNK, Estimate, _estimate, _weights, task_kind
from training.model import probabilities

log = logging.getLogger(__name__)
T_BOUNDS = (0.05, 20.0)  # the temperature searched, on a log scale
N_BINS = 15
BIASED = "resampling biases the metric; ECE upward, most for a well-calibrated model"
EPS = 1e-12  # probabilities clipped to [EPS, 1 - EPS] in the NLL
METRICS = {  # name: label in the report (all: lower is better)
    "ece": "ECE, top-label (equal-width bins)",
    "ece_mass": "ECE, top-label (equal-mass bins)",
    "classwise_ece": "Class-wise ECE (one-vs-rest, equal-width bins)",
    "brier": "Brier score",
    "nll": "NLL (log loss)",
}


def _2d(a: np.ndarray) -> np.ndarray:
    """(N, K) view of ``a`` ((N,) -> (N, 1)); (N, 0) when empty."""
    return a.reshape(len(a), -1) if a.ndim and a.size else np.empty((len(a) if a.ndim else 1, 0))


def _logits_and_labels(logits, labels, multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float64 logits and labels: (N, K) 0/1 (multi-label) or (N,) class indices."""
    z, y = _2d(np.asarray(logits, dtype=np.float64)), _2d(np.asarray(labels))
    if not z.size:
        raise DataError("calibration: no logits to fit a temperature on (empty validation split)")
    if not np.isfinite(z).all():
        raise DataError(f"calibration: {int((~np.isfinite(z)).sum())} logits are NaN or inf")
    want = z.shape[1] if multi_label else 1
    if y.shape != (len(z), want):
        raise DataError(f"calibration: logits {z.shape} but labels {y.shape}; expected (N, {want})")
    if not multi_label and z.shape[1] < 2:
        raise DataError("calibration: a softmax needs >= 2 logit columns (multi_label=True?)")
    bad = ~(np.isin(y, [0, 1]) if multi_label else (y == np.round(y)) & (y >= 0) & (y < z.shape[1]))
    if bad.any():
        kind = "0/1" if multi_label else f"class indices in [0, {z.shape[1]})"
        raise DataError(f"calibration: labels must be {kind}; got {np.unique(y[bad])[:5]}")
    return z, (y.astype(np.float64) if multi_label else y[:, 0].astype(np.int64))


def _minimise(nll, what: str) -> float:
    """exp of the log T in log(T_BOUNDS) minimising ``nll(log T)`` (unimodal: convex in 1/T)."""
    lo, hi = (math.log(b) for b in T_BOUNDS)
    res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-7})
    u = float(res.x)
    if not res.success or not nll(u) < nll(0.0):  # no gain over T = 1 (e.g. constant logits)
        return 1.0
    if min(u - lo, hi - u) < 1e-3:
        log.warning(
            "calibration: %s temperature %.4g is at a bound %s", what, math.exp(u), T_BOUNDS
        )
    return math.exp(u)


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, *, multi_label: bool
) -> tuple[float, ...]:
    """Temperature(s) minimising the validation NLL of ``logits / T``.

    Softmax (binary with 2 logits, multi-class, ordinal): one T, cross-entropy, ``labels``
    (N, 1) class indices. Multi-label: one T per label, binary cross-entropy per column,
    ``labels`` (N, K) 0/1. A label (softmax: the whole split) with a single class gets 1.0.
    """
    z, y = _logits_and_labels(logits, labels, multi_label)
    if not multi_label:
        if len(np.unique(y)) < 2:
            log.warning("calibration: the val split holds a single class; temperature 1.0")
            return (1.0,)
        rows = np.arange(len(z))

        def cross_entropy(u: float) -> float:
            s = z / math.exp(u)
            m = s.max(axis=1)
            return float(np.mean(m + np.log(np.exp(s - m[:, None]).sum(axis=1)) - s[rows, y]))

        return (_minimise(cross_entropy, "the"),)
    out = []
    for k, (zk, yk) in enumerate(zip(z.T, y.T, strict=True)):
        if yk.min() == yk.max():
            log.warning("calibration: val label %d holds a single class; temperature 1.0", k)
            out.append(1.0)
            continue

        def bce(u: float, zk=zk, yk=yk) -> float:
            s = zk / math.exp(u)
            return float(np.mean(np.logaddexp(0.0, s) - yk * s))

        out.append(_minimise(bce, f"label {k}"))
    return tuple(out)


def _as_probs(kind: str, labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float64 probabilities (binary: 2 columns) and labels: (N, K) 0/1 or (N,)."""
    p, y = _2d(np.asarray(probs, dtype=np.float64)), _2d(np.asarray(labels))
    if (
        not p.size
        or not y.size
        or len(p) != len(y)
        or (kind == "multi-label" and p.shape != y.shape)
    ):
        raise DataError(f"calibration metrics: labels {y.shape} but probabilities {p.shape}")
    if not np.isfinite(p).all() or p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise DataError("calibration metrics: probabilities must be finite and within [0, 1]")
    p = np.clip(p, 0.0, 1.0)
    if kind == "multi-label":
        return p, y.astype(np.float64)
    if kind == "binary" and p.shape[1] == 1:  # P(class 1) only
        p = np.c_[1 - p, p]
    if y.shape[1] != 1 or ((y < 0) | (y >= p.shape[1]) | (y != np.round(y))).any():
        raise DataError(f"calibration metrics: labels must be (N, 1) class indices < {p.shape[1]}")
    return p, y[:, 0].astype(np.int64)


def _columns(kind: str, y: np.ndarray, p: np.ndarray):
    """(top-label confidences, top-label correctness, one-vs-rest truth): each (N, C) float64;
    one top-label column for a softmax, one per label for multi-label."""
    if kind == "multi-label":
        return np.maximum(p, 1 - p), ((p > 0.5) == (y == 1)).astype(np.float64), y
    onehot = (y[:, None] == np.arange(p.shape[1])).astype(np.float64)
    return p.max(1, keepdims=True), (p.argmax(1) == y).astype(np.float64)[:, None], onehot


def _ece_width(w: np.ndarray, conf: np.ndarray, hit: np.ndarray, n_bins: int) -> np.ndarray:
    """(R, C): ECE per row of case weights ``w`` (R, N) and column, equal-width bins (lo, hi]
    as sklearn's ``calibration_curve`` (0 in the first): sum_b |sum_(i in b) w_i (hit - conf)| / sum w."""
    bins = np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], conf, side="left")  # (N, C)
    n, c = conf.shape
    gaps = np.zeros((n, c * n_bins))
    gaps[np.arange(n)[:, None], bins + n_bins * np.arange(c)] = hit - conf
    per_bin = (w @ gaps).reshape(len(w), c, n_bins)
    return np.abs(per_bin).sum(2) / w.sum(1, dtype=np.float64)[:, None]


def mass_bins(n: int, n_bins: int = N_BINS) -> np.ndarray:
    """Equal-mass bin of each rank 0..n-1 (cases sorted by confidence): sizes differ by <= 1."""
    return ((2 * np.arange(n) + 1) * n_bins) // (2 * n)


def _ece_mass(w: np.ndarray, conf: np.ndarray, hit: np.ndarray, n_bins: int) -> np.ndarray:
    """(R, C): as :func:`_ece_width` with equal-mass bins of each resample (each row of ``w``
    sums to N): the copies of a case drawn k times take k consecutive ranks, as they would in
    the resampled array (stable sort), so a case can straddle two bins."""
    n, rows = conf.shape[0], len(w)
    bounds = np.searchsorted(mass_bins(n, n_bins), np.arange(n_bins), side="right")  # (B,)
    off = np.arange(rows)[:, None]
    out = np.empty((rows, conf.shape[1]))
    for j in range(conf.shape[1]):
        order = np.argsort(conf[:, j], kind="stable")
        gap = (hit[:, j] - conf[:, j])[order]
        wo = w[:, order].astype(np.float64)
        cw, cg = np.cumsum(wo, axis=1), np.cumsum(wo * gap, axis=1)  # copies, gaps up to each case
        # per row and bound R: the first case with more than R copies up to it (R - 1 is the last rank of a bin)
        i = np.searchsorted(
            (cw + (n + 1) * off).ravel(), (bounds + (n + 1) * off).ravel(), side="right"
        )
        i = i.reshape(rows, n_bins) - n * off
        prev = np.maximum(i - 1, 0)
        cw0 = np.where(i > 0, cw[off, prev], 0.0)
        cg0 = np.where(i > 0, cg[off, prev], 0.0)
        part = (bounds - cw0) * gap[np.minimum(i, n - 1)] * (i < n)  # its copies below R
        below = cg0 + part  # sum of gaps of the ranks < R
        out[:, j] = np.abs(np.diff(below, axis=1, prepend=0.0)).sum(1) / n
    return out


def _replicates(
    kind: str, y: np.ndarray, p: np.ndarray, w: np.ndarray, n_bins: int
) -> dict[str, np.ndarray]:
    """Every metric for each row of case weights ``w`` (R, N): {name: (R,)}."""
    conf, hit, onehot = _columns(kind, y, p)
    total = w.sum(1, dtype=np.float64)
    if kind == "multi-label":
        clipped = np.clip(p, EPS, 1 - EPS)
        loss = -(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).mean(1)
        brier = ((p - y) ** 2).mean(1)
    else:
        loss = -np.log(np.clip(p[np.arange(len(p)), y], EPS, None))
        brier = ((p - onehot) ** 2).sum(1) / (2 if kind == "binary" else 1)  # binary: (p1 - y)^2
    return {
        "ece": _ece_width(w, conf, hit, n_bins).mean(1),
        "ece_mass": _ece_mass(w, conf, hit, n_bins).mean(1),
        "classwise_ece": _ece_width(w, p, onehot, n_bins).mean(1),
        "brier": w @ brier / total,
        "nll": w @ loss / total,
    }


def calibration_metrics(
    task: str,
    labels,
    probs,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    n_bins: int = N_BINS,
) -> dict[str, Estimate]:
    """ECE (top-label; multi-label: the mean over labels of each label's), ECE on equal-mass
    bins, class-wise ECE (mean over classes / labels of one-vs-rest ECE), Brier (multi-class:
    sum over classes; binary: (P(class 1) - y)^2; multi-label: mean over labels) and NLL,
    each with a percentile bootstrap CI over ``n_boot`` resamples of the cases."""
    if n_boot < 0 or not 0 < ci < 1 or n_bins < 1:
        raise ConfigError(
            f"calibration metrics: n_boot {n_boot} >= 0, ci {ci} in (0, 1), n_bins {n_bins} >= 1"
        )
    kind = task_kind(task)
    p, y = _as_probs(kind, labels, probs)
    point = _replicates(kind, y, p, np.ones((1, len(p))), n_bins)
    rng, step = np.random.default_rng(seed), max(1, _CHUNK // len(p))
    parts: dict[str, list[np.ndarray]] = {m: [np.empty(0)] for m in point}
    for start in range(0, n_boot, step):
        w = _weights(len(p), min(step, n_boot - start), rng)
        for m, r in _replicates(kind, y, p, w, n_bins).items():
            parts[m].append(r)
    out = {m: _estimate(float(point[m][0]), np.concatenate(parts[m]), ci) for m in METRICS}
    for m, e in out.items():  # ECE near 0 is biased upward in resamples: say so where it shows
        if math.isfinite(e.ci_low) and not e.ci_low <= e.value <= e.ci_high:
            out[m] = replace(e, note=f"the value lies outside the percentile CI ({BIASED})")
    return out


@dataclass
class CalibrationReport:
    task: str
    temperature: tuple[float, ...]  # fitted on val: one (softmax) or one per label
    before: dict[str, Estimate]  # on ``split``, T = 1
    after: dict[str, Estimate]  # on ``split``, the fitted temperature
    n: int  # cases in ``split``
    split: str = "test"
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0

    def flat_metrics(self) -> dict[str, float]:
        """MLflow-ready: ``test_ece_before``, ``test_ece_after_ci_low``, ``temperature`` or
        ``temperature_<i>`` (one per label)."""
        out: dict[str, float] = {}
        for when, metrics in (("before", self.before), ("after", self.after)):
            for m, e in metrics.items():
                key = f"{self.split}_{m}_{when}"
                out.update({key: e.value, f"{key}_ci_low": e.ci_low, f"{key}_ci_high": e.ci_high})
        if len(self.temperature) == 1:
            out["temperature"] = self.temperature[0]
        else:
            out.update({f"temperature_{i}": t for i, t in enumerate(self.temperature)})
        return out

    def to_markdown(self) -> str:
        """One table: metric | before (CI) | after (CI), then the notes."""
        pct = f"{round(self.ci * 100)}% CI"

        def val(e: Estimate) -> str:
            v = f"{e.value:.4f}" if math.isfinite(e.value) else "n/a"
            return (
                f"{v} ({e.ci_low:.4f}–{e.ci_high:.4f})" if math.isfinite(e.ci_low) else f"{v} (n/a)"
            )

        temps = ", ".join(f"{t:.4g}" for t in self.temperature)
        lines = [
            f"### Calibration, {self.split} split (n = {self.n}, task {self.task})\n",
            f"Temperature scaling fitted on the validation split by NLL: T = {temps} "
            f"({'one per label' if len(self.temperature) > 1 else 'one for all classes'}).",
            f"{pct}: percentile bootstrap over {self.n_boot} resamples of the {self.split} cases "
            f"(seed {self.seed}), the same resamples before and after. Lower is better; "
            f"ECE: {N_BINS} bins.\n",
            f"| metric | before ({pct}) | after ({pct}) |\n| --- | --- | --- |",
        ]
        lines += [
            f"| {METRICS[m]} | {val(e)} | {val(self.after[m])} |" for m, e in self.before.items()
        ]
        notes = [
            f"- {METRICS[m]}, {w}: {e.note}"
            for w, d in (("before", self.before), ("after", self.after))
            for m, e in d.items()
            if e.note
        ]
        return "\n".join(lines + (["", "Notes:", *notes] if notes else [])) + "\n"

    def to_dict(self) -> dict:
        """JSON-serialisable (NaN -> null), with the markdown."""
        data = asdict(self)
        data["markdown"] = self.to_markdown()
        return json.loads(json.dumps(data), parse_constant=lambda _: None)


def calibrate(
    task: str,
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    *,
    seed: int = 0,
    n_boot: int = 1000,
) -> tuple[tuple[float, ...], CalibrationReport]:
    """Fit the temperature on val; report the metrics on test before (T = 1) and after."""
    multi_label = task_kind(task) == "multi-label"
    temperature = fit_temperature(val_logits, val_labels, multi_label=multi_label)
    z, _ = _logits_and_labels(test_logits, test_labels, multi_label)
    if z.shape[1] != np.asarray(val_logits).reshape(len(val_logits), -1).shape[1]:
        raise DataError(
            f"calibration: val and test logits differ in columns ({np.shape(val_logits)}, {z.shape})"
        )
    test_logits = np.asarray(test_logits)
    before, after = (
        calibration_metrics(
            task,
            test_labels,
            probabilities(test_logits, multi_label=multi_label, temperature=t),
            n_boot=n_boot,
            seed=seed,
        )
        for t in ((1.0,), temperature)
    )
    return temperature, CalibrationReport(
        task, temperature, before, after, len(z), n_boot=n_boot, seed=seed
    )
