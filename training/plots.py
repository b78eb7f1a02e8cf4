"""Test-split pictures people would rather look at: ROC curves and a confusion matrix.

Written as PNG files and logged to the active MLflow run under ``plots/``::

    python -c "import numpy as np; from training.plots import roc_figure; \
roc_figure(np.array([[0],[1]]), np.array([[.8,.2],[.3,.7]]), ('a','b')).savefig('roc.png')"
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from training.spec import ModelSpec


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_figure(
    labels: np.ndarray, probs: np.ndarray, class_names: tuple[str, ...], multi_label: bool = False
):
    """One-vs-rest ROC curve per class (the positive class only, for two classes)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    classes = [1] if len(class_names) == 2 and not multi_label else range(len(class_names))
    for c in classes:
        truth = labels[:, c] if multi_label else labels[:, 0] == c
        if len(np.unique(truth)) == 2:
            RocCurveDisplay.from_predictions(truth, probs[:, c], name=class_names[c], ax=ax)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_title("ROC, test split")
    fig.tight_layout()
    return fig


def confusion_figure(labels: np.ndarray, probs: np.ndarray, class_names: tuple[str, ...]):
    """Confusion matrix of the arg-max prediction (single-label tasks)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay.from_predictions(
        labels[:, 0],
        probs.argmax(axis=1),
        labels=list(range(len(class_names))),
        display_labels=list(class_names),
        ax=ax,
        colorbar=False,
    )
    ax.set_title("Confusion matrix, test split")
    fig.tight_layout()
    return fig


def log_test_plots(spec: ModelSpec, labels: np.ndarray, probs: np.ndarray) -> None:
    """Log ``plots/roc_test.png`` (and ``plots/confusion_test.png``) to the active MLflow run."""
    import mlflow

    plt = _pyplot()
    figures = {"roc_test.png": roc_figure(labels, probs, spec.class_names, spec.multi_label)}
    if not spec.multi_label:
        figures["confusion_test.png"] = confusion_figure(labels, probs, spec.class_names)
    for name, fig in figures.items():
        mlflow.log_figure(fig, f"plots/{name}")
        plt.close(fig)
