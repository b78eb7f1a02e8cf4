"""Test-split metrics with scikit-learn: MedMNIST's AUC/ACC and a clinical report.

:func:`evaluate`: AUC and ACC as the MedMNIST evaluator defines them, used every epoch.
:func:`choose_thresholds`: operating thresholds chosen on the VALIDATION split (binary: one
on P(class 1); multi-label: one per finding; multi-class and ordinal: none, the arg-max).
:func:`clinical_report`: on the TEST split, AUC (macro and per class), ACC, sensitivity,
specificity, PPV, NPV and F1 at those thresholds (per class, one-vs-rest at the arg-max for
multi-class, and macro), each with a percentile bootstrap CI over resampled cases::

    python -c "import numpy as np; from training.metrics import *; \
y = np.array([[0],[0],[1],[1],[1]]); p = np.array([[.9,.1],[.6,.4],[.7,.3],[.2,.8],[.1,.9]]); \
print(clinical_report('binary-class', y, p, choose_thresholds('binary-class', y, p), ('a','b')).to_markdown())"
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from training.errors import ConfigError, DataError

THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1")
METRICS = {  # name: (label in the report, why it can be undefined on a split)
    "auc": ("AUC", "the test split holds a single class"),
    "acc": ("ACC (arg-max, or 0.5 per label)", ""),
    "acc_at_threshold": ("ACC at the operating threshold", ""),
    "sensitivity": ("Sensitivity", "no positive case in the test split"),
    "specificity": ("Specificity", "no negative case in the test split"),
    "ppv": ("PPV", "no case predicted positive"),
    "npv": ("NPV", "no case predicted negative"),
    "f1": ("F1", "no positive case and none predicted"),
}
log = logging.getLogger(__name__)
MIN_RESAMPLES = 10  # fewer resamples with a defined value: no CI
_CHUNK = 4_000_000  # resamples x cases held in memory at once


def evaluate(task: str, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``{"auc": ..., "acc": ...}``; AUC is NaN when a split holds a single class."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    probs = np.asarray(probs, dtype=np.float64)
    if len(labels) != len(probs):
        raise DataError(f"metrics: {len(labels)} labels but {len(probs)} predictions")
    if task.startswith("multi-label"):
        aucs = [
            roc_auc_score(labels[:, i], probs[:, i])
            for i in range(labels.shape[1])
            if len(np.unique(labels[:, i])) == 2
        ]
        auc = float(np.mean(aucs)) if aucs else float("nan")
        acc = float(np.mean(np.all((probs > 0.5) == (labels == 1), axis=1)))
        return {"auc": auc, "acc": acc}
    y = labels[:, 0]
    present = np.unique(y)
    if len(present) < 2:
        auc = float("nan")
    elif probs.shape[1] == 2:
        auc = float(roc_auc_score(y, probs[:, 1]))
    else:  # macro one-vs-rest over the classes present (all of them on a full split)
        auc = float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))
    return {"auc": auc, "acc": float(accuracy_score(y, probs.argmax(axis=1)))}


def task_kind(task: str) -> str:
    """ "binary", "multi-label" or "multi-class" (which includes ordinal regression)."""
    if task.startswith("multi-label"):
        return "multi-label"
    if task.startswith("binary"):
        return "binary"
    if task.startswith(("multi-class", "ordinal")):
        return "multi-class"
    raise ConfigError(f"metrics: unknown task {task!r}")


def _columns(kind: str, labels, probs, positive: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(truth, scores), both (N, K): one column per positive class (binary: the finding,
    column ``positive`` of the probabilities; -1: the last, label 1)."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
    bad = not len(labels) or len(labels) != len(probs)
    if bad or (kind == "multi-label" and labels.shape != probs.shape):
        raise DataError(f"metrics: labels {labels.shape} but predictions {probs.shape}")
    if kind == "multi-label":
        return labels == 1, probs
    y = labels[:, 0].astype(int)
    if kind == "binary":
        if probs.shape[1] == 1:  # P(class 1) only
            return (y == 1)[:, None], probs
        k = positive % probs.shape[1]
        return (y == k)[:, None], probs[:, k : k + 1]
    return y[:, None] == np.arange(probs.shape[1]), probs


def choose_thresholds(
    task: str,
    val_labels: np.ndarray,
    val_probs: np.ndarray,
    rule: str = "youden",
    *,
    positive: int = -1,
) -> np.ndarray:
    """Operating thresholds chosen on the validation split; a case is positive if p >= t.

    ``rule``: "youden" (max sensitivity + specificity - 1 on ``roc_curve``), "sensNN" (the
    highest threshold with sensitivity >= NN%) or "specNN" (the lowest with specificity
    >= NN%). Binary: one threshold on P(finding), column ``positive``; multi-label: one per finding; multi-class:
    an empty array (the arg-max is predicted). A finding with a single class in val gets 0.5.
    """
    match = re.fullmatch(r"(sens|spec)(\d{1,2}(?:\.\d+)?)", rule)
    if rule != "youden" and not match:
        raise ConfigError(f"threshold rule {rule!r}: use 'youden', 'sensNN' or 'specNN'")
    kind = task_kind(task)
    if kind == "multi-class":
        return np.empty(0)
    truth, scores = _columns(kind, val_labels, val_probs, positive)
    out, target = [], float(match[2]) / 100 if match else 0.0
    for k, (y, s) in enumerate(zip(truth.T, scores.T, strict=True)):
        if y.all() or not y.any():
            log.warning("thresholds: val column %d holds one class; threshold 0.5", k)
            out.append(0.5)
            continue
        fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
        if match is None:
            i = int(np.argmax(tpr - fpr))
        elif match[1] == "sens":
            i = int(np.argmax(tpr >= target - 1e-12))
        else:
            i = int(np.flatnonzero(fpr <= 1 - target + 1e-12)[-1])
        out.append(float(thr[i]) if np.isfinite(thr[i]) else float(np.nextafter(s.max(), 2)))
    return np.asarray(out)


@dataclass(frozen=True)
class Estimate:
    value: float
    ci_low: float
    ci_high: float
    n_boot: int  # resamples in which the metric was defined
    note: str = ""


def _estimate(value: float, reps: np.ndarray, ci: float, why: str = "", note: str = "") -> Estimate:
    """Point value, percentile CI of the finite replicates; ``why`` explains a NaN value."""
    ok = reps[np.isfinite(reps)]
    lo = hi = float("nan")
    if not math.isfinite(value):
        note = f"undefined: {why}" if why else "undefined"
    elif len(ok) >= MIN_RESAMPLES:
        lo, hi = (float(q) for q in np.percentile(ok, [50 * (1 - ci), 50 * (1 + ci)]))
    else:
        note = "; ".join(filter(None, [note, f"no CI: defined in {len(ok)} resamples"]))
    return Estimate(float(value), lo, hi, len(ok), note)


@dataclass
class ClinicalReport:
    task: str
    class_names: tuple[str, ...]
    rule: str  # how the thresholds were chosen on val ("argmax" for multi-class)
    thresholds: tuple[float, ...]  # per positive class; empty for multi-class
    n_cases: int
    n_boot: int
    ci: float
    seed: int
    overall: dict[str, Estimate]  # binary: the positive class; otherwise the macro mean
    per_class: dict[str, dict[str, Estimate]]  # multi-label / multi-class, one-vs-rest
    positives: dict[str, int]  # test cases per positive class

    @property
    def finding(self) -> str:
        """The positive class of a binary report (its one entry in ``positives``)."""
        return next(iter(self.positives)) if self.positives else self.class_names[-1]

    def flat_metrics(self, prefix: str = "test_") -> dict[str, float]:
        """MLflow-ready: ``test_sensitivity``, ``..._ci_low``, ``test_auc_<class>``, ..."""
        out: dict[str, float] = {}

        def put(key: str, e: Estimate) -> None:
            out.update({key: e.value, f"{key}_ci_low": e.ci_low, f"{key}_ci_high": e.ci_high})

        for metric, e in self.overall.items():
            put(f"{prefix}{metric}", e)
        if len(self.thresholds) == 1 and not self.per_class:
            out[f"{prefix}threshold"] = self.thresholds[0]
        used: set[str] = set()
        for i, (name, metrics) in enumerate(self.per_class.items()):
            slug = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")[:48] or f"class{i}"
            slug = f"{slug}_{i}" if slug in used else slug
            used.add(slug)
            for metric, e in metrics.items():
                put(f"{prefix}{metric}_{slug}", e)
            if self.thresholds:
                out[f"{prefix}threshold_{slug}"] = self.thresholds[i]
        return out

    def to_markdown(self) -> str:
        """Tables people read: metric, value, CI, resamples used; then one row per class."""
        pct = f"{round(self.ci * 100)}% CI"

        def val(e: Estimate, with_ci: bool = False) -> str:
            ci = f"{e.ci_low:.3f}–{e.ci_high:.3f}" if math.isfinite(e.ci_low) else "n/a"
            v = f"{e.value:.3f}" if math.isfinite(e.value) else "n/a"
            return f"{v} ({ci})" if with_ci else f"{v} | {ci}"

        how = "Predicted class: the arg-max (no threshold); per-class metrics are one-vs-rest."
        if self.rule != "argmax":
            on = f"{self.thresholds[0]:.4f} on P({self.finding})"
            on = "per finding (below)" if self.per_class else on
            how = f"Operating threshold {on}, chosen on the validation split (rule {self.rule})."
        lines = [
            f"### Clinical metrics, test split (n = {self.n_cases}, task {self.task})\n",
            how,
            f"{pct}: percentile bootstrap over {self.n_boot} resamples of the test cases "
            f"(seed {self.seed}); 'resamples': those where the metric is defined.\n",
            f"| metric | value | {pct} | resamples |\n| --- | --- | --- | --- |",
        ]
        macro = " (macro)" if self.per_class else ""
        for m, e in self.overall.items():
            label = METRICS[m][0] + ("" if m.startswith("acc") else macro)
            lines.append(f"| {label} | {val(e)} | {e.n_boot}/{self.n_boot} |")
        if self.per_class:
            cols = list(next(iter(self.per_class.values())))
            head = ["class", "positives"] + ["threshold"] * bool(self.thresholds)
            head += [f"{METRICS[m][0]} ({pct})" for m in cols]
            lines += ["", "| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
            for i, (name, ms) in enumerate(self.per_class.items()):
                row = [name, str(self.positives[name])]
                row += [f"{t:.4f}" for t in self.thresholds[i : i + 1]]
                lines.append("| " + " | ".join(row + [val(ms[m], True) for m in cols]) + " |")
        found = [(m, "", e) for m, e in self.overall.items()]
        found += [(m, f", {c}", e) for c, ms in self.per_class.items() for m, e in ms.items()]
        notes = [f"- {METRICS[m][0]}{c}: {e.note}" for m, c, e in found if e.note]
        return "\n".join(lines + (["", "Notes:", *notes] if notes else [])) + "\n"

    def to_dict(self) -> dict:
        """JSON-serialisable (NaN -> null), with the thresholds, the rule and the markdown."""
        data = asdict(self)
        data["threshold_source"] = "validation split" if self.thresholds else "none (arg-max)"
        data["markdown"] = self.to_markdown()
        return json.loads(json.dumps(data), parse_constant=lambda _: None)


def _weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n): how often each case is drawn in each resample (with replacement)."""
    idx = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    return np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float32)


def _weighted_auc(w: np.ndarray, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ROC AUC per row of case weights ``w`` (Mann-Whitney, ties count 1/2); NaN if one class."""
    order = np.argsort(s, kind="stable")
    ss, yo = s[order], y[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])  # groups of tied scores
    wo = w[:, order]
    pos = wo * yo if len(starts) == len(s) else np.add.reduceat(wo * yo, starts, axis=1)
    neg = (wo if len(starts) == len(s) else np.add.reduceat(wo, starts, axis=1)) - pos
    below = np.cumsum(neg, axis=1)  # negatives scored <= each group
    keep = np.add.reduceat(yo, starts) > 0  # only groups holding a positive add to the sum
    num = (pos[:, keep] * (below[:, keep] - 0.5 * neg[:, keep])).sum(1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / (pos.sum(1, dtype=np.float64) * neg.sum(1, dtype=np.float64))


def _per_class(w: np.ndarray, truth, scores, pred) -> dict[str, np.ndarray]:
    """Each metric, (rows of w, K): from weighted confusion counts, formulas as in sklearn."""
    tp, fp = w @ (truth & pred), w @ (~truth & pred)
    fn, tn = w @ (truth & ~pred), w @ (~truth & ~pred)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
        }
    out["auc"] = np.stack(
        [_weighted_auc(w, y, s) for y, s in zip(truth.T, scores.T, strict=True)], axis=1
    )
    return out


def clinical_report(
    task: str,
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray | None,
    class_names: tuple[str, ...],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    rule: str = "youden",
    positive: int = -1,
) -> ClinicalReport:
    """The report on the TEST split at ``thresholds`` (chosen on val). Point values: sklearn
    on the whole split; CIs: ``n_boot`` resamples (vectorised weighted counts), skipping those
    where a metric is undefined. Undefined on the split itself: NaN, the reason in ``note``.
    Binary: every threshold metric is about the finding, column ``positive`` (-1: label 1).
    """
    if n_boot < 0 or not 0 < ci < 1:
        raise ConfigError(f"clinical report: n_boot {n_boot} must be >= 0, ci {ci} in (0, 1)")
    kind = task_kind(task)
    truth, scores = _columns(kind, labels, probs, positive)
    names = (class_names[positive],) if kind == "binary" else tuple(class_names)
    t = np.atleast_1d(np.asarray([] if thresholds is None else thresholds, dtype=np.float64))
    if len(t) != (0 if kind == "multi-class" else truth.shape[1]) or len(names) != len(truth.T):
        raise DataError(f"clinical report: {len(t)} thresholds, {len(names)} names for {kind}")
    arg = np.asarray(probs).reshape(len(truth), -1).argmax(1)
    first = evaluate(task, labels, probs)  # MedMNIST's AUC and ACC, as logged every epoch
    pred = arg[:, None] == np.arange(len(truth.T)) if kind == "multi-class" else scores >= t
    hit = ((scores > 0.5) == truth).all(1) if kind == "multi-label" else None  # MedMNIST's ACC
    hit = arg == np.asarray(labels).reshape(-1) if hit is None else hit
    correct = {"acc": hit, "acc_at_threshold": (pred == truth).all(1)}
    if kind == "multi-class":  # no threshold: the arg-max is the prediction
        rule, _ = "argmax", correct.pop("acc_at_threshold")
    acc = {"acc": first["acc"], "acc_at_threshold": float(accuracy_score(truth, pred))}
    point = {m: np.full(len(names), np.nan) for m in ("auc", *THRESHOLD_METRICS)}
    for k, (y, p) in enumerate(zip(truth.T.astype(int), pred.T.astype(int), strict=True)):
        prec, rec, f1, _ = precision_recall_fscore_support(
            y, p, labels=[0, 1], average=None, zero_division=np.nan
        )
        point["npv"][k], point["ppv"][k] = prec
        point["specificity"][k], point["sensitivity"][k] = rec
        point["f1"][k] = f1[1]
        if 0 < y.sum() < len(y):
            point["auc"][k] = roc_auc_score(y, scores[:, k])

    rng, step = np.random.default_rng(seed), max(1, _CHUNK // len(truth))  # bounded memory
    parts = {m: [np.empty((0, 1 if m in correct else len(names)))] for m in (*point, *correct)}
    for start in range(0, n_boot, step):
        w = _weights(len(truth), min(step, n_boot - start), rng)
        for m, r in _per_class(w, truth, scores, pred).items():
            parts[m].append(r)
        for m, c in correct.items():
            parts[m].append((w @ c / len(truth))[:, None])
    reps = {m: np.concatenate(r) for m, r in parts.items()}

    per_class = {
        name: {m: _estimate(point[m][k], reps[m][:, k], ci, METRICS[m][1]) for m in point}
        for k, name in enumerate(names)
    }
    # "auc" first (the report's order), its estimate set with the other per-class means below
    overall: dict[str, Any] = {
        "auc": None,
        **{m: _estimate(acc[m], reps[m][:, 0], ci) for m in correct},
    }
    for m in point:
        missing = [n for n, v in zip(names, point[m], strict=True) if not math.isfinite(v)]
        note = f"mean over {len(names) - len(missing)} of {len(names)} classes; undefined for "
        note = note + ", ".join(missing) if missing and kind != "binary" else ""
        with warnings.catch_warnings():  # every class undefined: NaN, "Mean of empty slice"
            warnings.simplefilter("ignore", RuntimeWarning)
            value = first["auc"] if m == "auc" else float(np.nanmean(point[m]))
            overall[m] = _estimate(value, np.nanmean(reps[m], axis=1), ci, METRICS[m][1], note)
    positives = {n: int(c) for n, c in zip(names, truth.sum(0), strict=True)}
    head = (task, tuple(class_names), rule, tuple(float(x) for x in t), len(truth), n_boot, ci)
    return ClinicalReport(*head, seed, overall, per_class if kind != "binary" else {}, positives)
