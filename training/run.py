"""``medimg train``: an MLflow run around Ray Train, test evaluation, registration.

The test split is touched once, at the end, on the checkpoint with the best
val AUC. A failure closes the MLflow run with status FAILED::

    medimg train --dataset pneumoniamnist --epochs 3
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from training.config import TrainConfig
from training.data import SPLITS, load_split, prepare_split
from training.errors import MedimgError, TrainingError
from training.metrics import evaluate
from training.model import ProbabilityHead, build_model, load_weights, predict_proba
from training.registry import ensure_experiment, log_and_register
from training.spec import ModelSpec

log = logging.getLogger(__name__)
PARAMS = (
    "dataset",
    "size",
    "image_size",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "workers",
    "cpus_per_worker",
    "use_gpu",
    "max_train_samples",
    "seed",
)


@dataclass
class TrainOutcome:
    run_id: str
    model_name: str
    version: str
    model_uri: str
    val: dict[str, float]
    test: dict[str, float]
    test_probs: np.ndarray
    test_labels: np.ndarray
    spec: ModelSpec


def train_and_register(cfg: TrainConfig) -> TrainOutcome:
    """Train with Ray, evaluate the best checkpoint on test, log and register it in MLflow.

    Any failure leaves the MLflow run closed with status FAILED (MLflow's run
    context does that) and surfaces as a :class:`MedimgError`.
    """
    import mlflow

    experiment_id = ensure_experiment(cfg.tracking_uri, cfg.experiment)
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"train-{cfg.dataset}") as run:
            cfg.mlflow_run_id = run.info.run_id
            return _train_in_run(cfg)
    except MedimgError:
        raise
    except Exception as exc:
        raise TrainingError(
            f"training run {cfg.mlflow_run_id} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _train_in_run(cfg: TrainConfig) -> TrainOutcome:
    import mlflow

    from training.plots import log_test_plots
    from training.train import fit, resolve_resources

    spec = ModelSpec.for_dataset(cfg.dataset, cfg.image_size)
    for split in SPLITS:  # fail here, not inside Ray workers, on missing or bad data
        load_split(cfg.dataset, split, cfg.data_dir, cfg.size)
    cfg = resolve_resources(cfg)
    mlflow.log_params({k: getattr(cfg, k) for k in PARAMS})
    best = fit(cfg)
    val = {"auc": float(best.metrics["val_auc"]), "acc": float(best.metrics["val_acc"])}
    mlflow.log_metrics(
        {
            "best_val_auc": val["auc"],
            "best_val_acc": val["acc"],
            "best_epoch": best.metrics["epoch"],
        }
    )
    state, _ = load_weights(best.weights)
    model = build_model(spec.channels, spec.num_classes)
    model.load_state_dict(state)

    # The test split, touched once: the best checkpoint by val AUC.
    test = prepare_split(
        cfg.dataset, "test", cfg.data_dir, size=cfg.size, image_size=cfg.image_size
    )
    probs = predict_proba(model, test.x, multi_label=spec.multi_label)
    scores = evaluate(spec.task, test.y, probs)
    mlflow.log_metrics({"test_auc": scores["auc"], "test_acc": scores["acc"]})
    log_test_plots(spec, test.y, probs)
    served = ProbabilityHead(model, spec.multi_label).eval()
    model_uri, version = log_and_register(served, spec, spec.model_name)
    return TrainOutcome(
        run_id=cfg.mlflow_run_id,
        model_name=spec.model_name,
        version=version,
        model_uri=model_uri,
        val=val,
        test=scores,
        test_probs=probs,
        test_labels=test.y,
        spec=spec,
    )
