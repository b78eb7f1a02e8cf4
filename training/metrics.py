"""AUC and ACC as the MedMNIST evaluator defines them, computed with scikit-learn.

binary: AUC of the positive-class probability; single-label: macro
one-vs-rest AUC, ACC of the arg-max (0.5 for two classes); multi-label: mean per-label AUC, ACC of
all labels right at 0.5::

    python -c "import numpy as np; from training.metrics import evaluate; \
print(evaluate('binary-class', np.array([[0],[1]]), np.array([[.8,.2],[.3,.7]])))"
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

from training.errors import DataError


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
