"""The reliability diagram of temperature scaling, and logging the calibration report.

:func:`reliability_figure`: top-label accuracy against confidence per equal-width bin,
before and after scaling, with the diagonal and the number of cases per bin below;
:func:`log_calibration`: the report's metrics, ``calibration/calibration.md``, ``.json``
and ``calibration/reliability.png`` to the active MLflow run::

    python -c "import numpy as np; from training.reliability import reliability_figure; \
y = np.array([[0],[1],[1],[0]]); p = np.array([[.9,.1],[.2,.8],[.4,.6],[.3,.7]]); \
reliability_figure('binary-class', y, p, np.sqrt(p) / np.sqrt(p).sum(1, keepdims=True)).savefig('rel.png')"
"""

from __future__ import annotations

import numpy as np

from training.calibration import N_BINS, CalibrationReport, _as_probs, _columns, calibration_metrics
from training.errors import RegistryError
from training.metrics import task_kind


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_curve(
    task: str, labels, probs, *, n_bins: int = N_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-label (mean confidence, accuracy, count) per equal-width bin (lo, hi], NaN where
    empty; multi-label: the (case, label) pairs pooled, confidence max(p, 1 - p)."""
    kind = task_kind(task)
    p, y = _as_probs(kind, labels, probs)
    conf, hit, _ = (a.ravel() for a in _columns(kind, y, p))
    bins = np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], conf, side="left")
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, conf, n_bins) / count
        accuracy = np.bincount(bins, hit, n_bins) / count
    return mean_conf, accuracy, count


def reliability_figure(task: str, labels, probs_before, probs_after, *, n_bins: int = N_BINS):
    """Accuracy vs confidence per bin before and after temperature scaling (top panel) and
    the cases per bin (bottom); the title gives the ECE of each (multi-label: mean over labels)."""
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    width = 1 / n_bins
    left = np.arange(n_bins) * width
    eces = []
    for i, (name, probs, style) in enumerate(
        [("before", probs_before, "o--"), ("after", probs_after, "s-")]
    ):
        conf, acc, count = reliability_curve(task, labels, probs, n_bins=n_bins)
        ece = calibration_metrics(task, labels, probs, n_boot=0, n_bins=n_bins)["ece"].value
        eces.append(ece)
        shown = count > 0
        color = ("tab:red", "tab:blue")[i]
        ax.plot(conf[shown], acc[shown], style, color=color, label=f"{name} (ECE {ece:.3f})")
        hist.bar(left + width * (0.25 + 0.5 * i), count, width=width / 2, color=color, label=name)
    pooled = " ((case, label) pairs pooled)" if task_kind(task) == "multi-label" else ""
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="accuracy" + pooled)
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(
        f"Reliability, top-label, {n_bins} bins\nECE {eces[0]:.3f} before → {eces[1]:.3f} after"
        " temperature scaling",
        fontsize="medium",
    )
    hist.set(xlabel="confidence", ylabel="cases per bin")
    hist.legend(fontsize="small")
    fig.tight_layout()
    return fig


def log_calibration(report: CalibrationReport, figure) -> None:
    """Log ``report.flat_metrics()``, ``calibration/calibration.md``, ``.json`` and the
    figure as ``calibration/reliability.png`` to the active MLflow run (then close it)."""
    import mlflow

    if mlflow.active_run() is None:
        raise RegistryError(
            "calibration: no active MLflow run to log to (start one with mlflow.start_run)"
        )
    mlflow.log_metrics(report.flat_metrics())
    mlflow.log_text(report.to_markdown(), "calibration/calibration.md")
    mlflow.log_dict(report.to_dict(), "calibration/calibration.json")
    mlflow.log_figure(figure, "calibration/reliability.png")
    _pyplot().close(figure)
