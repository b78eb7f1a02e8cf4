"""Test-split pictures and the clinical report, logged to the active MLflow run.

ROC curves with the operating point marked, and a confusion matrix at the threshold chosen
on the validation split (binary), at the arg-max (multi-class), or per-finding confusion
counts (multi-label) go under ``plots/``; the clinical report under ``reports/``::

    python -c "import numpy as np; from training.plots import roc_figure; \
roc_figure(np.array([[0],[1]]), np.array([[.8,.2],[.3,.7]]), ('a','b'), thresholds=[.5]).savefig('roc.png')"
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay, multilabel_confusion_matrix

from training.errors import RegistryError
from training.metrics import ClinicalReport
from training.spec import ModelSpec


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _predicted(probs: np.ndarray, multi_label: bool, thresholds, positive: int = 1) -> np.ndarray:
    """(N, K) bool: the operating decision per class column (arg-max when no threshold;
    binary: P(finding) in column ``positive`` against the threshold)."""
    probs = np.asarray(probs)
    if multi_label:
        return probs >= (
            0.5 if thresholds is None or not len(thresholds) else np.asarray(thresholds)
        )
    if probs.shape[1] == 2 and thresholds is not None and len(thresholds) == 1:
        hit = probs[:, positive] >= float(np.asarray(thresholds).ravel()[0])
        return np.stack([hit, ~hit][:: 1 if positive == 0 else -1], axis=1)
    return probs.argmax(1)[:, None] == np.arange(probs.shape[1])


def roc_figure(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: tuple[str, ...],
    multi_label: bool = False,
    thresholds: Sequence[float] | np.ndarray | None = None,
    positive: int = 1,
):
    """One-vs-rest ROC curve per class (the finding only, column ``positive``, for two).

    With ``thresholds`` (empty for multi-class: the arg-max), each curve's operating point
    on the test split is marked.
    """
    plt = _pyplot()
    labels = np.asarray(labels).reshape(len(labels), -1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    binary = len(class_names) == 2 and not multi_label
    classes = [positive] if binary else range(len(class_names))
    pred = None if thresholds is None else _predicted(probs, multi_label, thresholds, positive)
    marked = False
    for c in classes:
        truth = labels[:, c] == 1 if multi_label else labels[:, 0] == c
        if len(np.unique(truth)) < 2:
            continue
        RocCurveDisplay.from_predictions(truth, probs[:, c], name=class_names[c], ax=ax)
        if pred is not None:
            color = ax.get_lines()[-1].get_color()
            fpr, tpr = pred[~truth, c].mean(), pred[truth, c].mean()
            label = "operating point" if not marked else None
            ax.plot(fpr, tpr, "o", ms=8, color=color, markeredgecolor="black", label=label)
            marked = True
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    if marked:
        ax.legend(loc="lower right", fontsize="small")
    ax.set_title("ROC, test split" + (" (threshold chosen on val)" if marked else ""))
    fig.tight_layout()
    return fig


def confusion_figure(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: tuple[str, ...],
    threshold: float | None = None,
    positive: int = 1,
):
    """Confusion matrix (single-label tasks): at ``threshold`` on P(finding), column
    ``positive``, for a binary task, else of the arg-max prediction."""
    plt = _pyplot()
    labels, probs = np.asarray(labels).reshape(len(labels), -1), np.asarray(probs)
    if threshold is not None:
        hit = probs[:, positive] >= threshold
        predicted = np.where(hit, positive, 1 - positive)
        how = f"P({class_names[positive]}) ≥ {threshold:.3f} (chosen on val)"
    else:
        predicted, how = probs.argmax(axis=1), "arg-max"
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay.from_predictions(
        labels[:, 0],
        predicted,
        labels=list(range(len(class_names))),
        display_labels=list(class_names),
        ax=ax,
        colorbar=False,
    )
    ax.set_title(f"Confusion matrix, test split\n{how}", fontsize="medium")
    fig.tight_layout()
    return fig


def multilabel_confusion_figure(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: tuple[str, ...],
    thresholds: Sequence[float] | np.ndarray | None = None,
):
    """Per-finding TP / FN / FP / TN at each finding's threshold (0.5 without), one row per
    finding; colour: the share of that finding's positives (TP, FN) or negatives (FP, TN)."""
    plt = _pyplot()
    pred = _predicted(probs, True, thresholds)
    cm = multilabel_confusion_matrix(np.asarray(labels), pred.astype(int))  # [[tn, fp], [fn, tp]]
    counts = np.stack([cm[:, 1, 1], cm[:, 1, 0], cm[:, 0, 1], cm[:, 0, 0]], axis=1)
    totals = np.stack([cm[:, 1].sum(1)] * 2 + [cm[:, 0].sum(1)] * 2, axis=1)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.4 * len(class_names)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(
            j, i, str(n), ha="center", va="center", color="white" if share[i, j] > 0.6 else "black"
        )
    ax.set_xticks(range(4), ["TP", "FN", "FP", "TN"])
    t = [0.5] * len(class_names) if thresholds is None or not len(thresholds) else thresholds
    ticks = [f"{n} (t={v:.2f})" for n, v in zip(class_names, t, strict=True)]
    ax.set_yticks(range(len(class_names)), ticks)
    ax.set_title("Per-finding confusion counts, test split", fontsize="medium")
    fig.tight_layout()
    return fig


def _require_run():
    import mlflow

    if mlflow.active_run() is None:
        raise RegistryError(
            "plots: no active MLflow run to log to (start one with mlflow.start_run)"
        )
    return mlflow


def log_test_plots(
    spec: ModelSpec,
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> None:
    """Log ``plots/roc_test.png`` and ``plots/confusion_test.png`` to the active MLflow run.

    ``thresholds`` are those chosen on val (:func:`training.metrics.choose_thresholds`);
    without them binary and multi-class use the arg-max and multi-label 0.5.
    """
    mlflow = _require_run()
    plt = _pyplot()
    labels = np.asarray(labels).reshape(len(labels), -1)
    positive = spec.positive_index if spec.num_classes == 2 else 1
    roc = roc_figure(labels, probs, spec.class_names, spec.multi_label, thresholds, positive)
    if spec.multi_label:
        confusion = multilabel_confusion_figure(labels, probs, spec.class_names, thresholds)
    else:
        binary = thresholds is not None and len(thresholds) == 1 and spec.num_classes == 2
        threshold = float(np.asarray(thresholds).ravel()[0]) if binary else None
        confusion = confusion_figure(labels, probs, spec.class_names, threshold, positive)
    for name, fig in {"roc_test.png": roc, "confusion_test.png": confusion}.items():
        mlflow.log_figure(fig, f"plots/{name}")
        plt.close(fig)


def log_clinical_report(report: ClinicalReport) -> None:
    """Log the report's metrics (``test_*``), ``reports/clinical_report.md`` and ``.json``."""
    mlflow = _require_run()
    mlflow.log_metrics(report.flat_metrics())
    mlflow.log_text(report.to_markdown(), "reports/clinical_report.md")
    mlflow.log_dict(report.to_dict(), "reports/clinical_report.json")
