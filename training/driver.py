"""``medimg train``: an MLflow run around Ray Train, one test evaluation, registration.

The temperature (calibration) and the operating threshold are fitted on the validation
split; the test split is touched once, at the end, on the checkpoint with the best val AUC. The new version becomes the
``champion`` only if its val AUC beats the current one's. A failure closes the MLflow
run with status FAILED; ``--resume`` continues it from its last checkpoint::

    medimg train --dataset pneumoniamnist --epochs 3
    medimg train --resume <MLflow run id | Ray run directory | checkpoint directory>

(what ``--resume`` accepts: ``training.resume``)
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from training.config import TrainConfig
from training.console import announce_run_dir
from training.data import DataOptions, check_data, open_split
from training.errors import ConfigError, MedimgError, TrainingError
from training.metrics import evaluate
from training.model import ProbabilityHead, build_model, predict_logits, probabilities
from training.registry import ensure_experiment, log_and_register
from training.resume import CONFIG_ARTIFACT, ResumeTarget
from training.spec import ModelSpec

if TYPE_CHECKING:
    from training.ray_trainer import Best

log = logging.getLogger(__name__)
NOT_LOGGED = {
    "mlflow_run_id",
    "tracking_uri",
    "resume_from",
    "data_dir",
    "storage_path",
    "cache_dir",
}


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
    thresholds: list[float] = field(default_factory=list)
    clinical: dict[str, Any] = field(default_factory=dict)
    champion: str = ""  # the champion decision, as a sentence
    calibration: dict[str, Any] = field(default_factory=dict)  # CalibrationReport.to_dict()


def new_ray_run_name(cfg: TrainConfig) -> str:
    return f"{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def train_and_register(cfg: TrainConfig, resume: ResumeTarget | None = None) -> TrainOutcome:
    """Train with Ray (or continue ``resume``), evaluate once on test, register in MLflow.

    Any failure leaves the MLflow run closed with status FAILED (MLflow's run context
    does that) and surfaces as a :class:`MedimgError`.
    """
    import mlflow

    run_id = resume.mlflow_run_id if resume else ""
    ray_name = resume.ray_run_name if resume and resume.ray_run_name else new_ray_run_name(cfg)
    announce_run_dir(log, f"{cfg.storage_path.rstrip('/')}/{ray_name}")
    experiment_id = ensure_experiment(cfg.tracking_uri, cfg.experiment)
    try:
        with mlflow.start_run(
            run_id=run_id or None,
            experiment_id=None if run_id else experiment_id,
            run_name=None if run_id else f"train-{cfg.dataset}",
        ) as run:
            cfg.mlflow_run_id = run.info.run_id
            if run_id:
                mlflow.set_tag("resumed_at", time.strftime("%Y-%m-%d %H:%M:%S"))
            else:
                log_config(cfg, ray_name)
            return _train_in_run(cfg, ray_name)
    except MedimgError:
        raise
    except Exception as exc:
        raise TrainingError(
            f"training run {cfg.mlflow_run_id} failed: {type(exc).__name__}: {exc}"
        ) from exc


def log_config(cfg: TrainConfig, ray_name: str) -> None:
    """Params (everything but paths and ids), the full config as JSON, and where Ray runs."""
    import mlflow

    values = cfg.to_dict()
    mlflow.log_params({k: v for k, v in values.items() if k not in NOT_LOGGED})
    mlflow.log_text(json.dumps(values, indent=2), CONFIG_ARTIFACT)
    mlflow.set_tags(
        {"ray_run_name": ray_name, "ray_storage_path": cfg.storage_path, "dataset": cfg.dataset}
    )


def preflight(cfg: TrainConfig) -> ModelSpec:
    """Fail in the driver, not inside every Ray worker: unknown data set, bad data, a bad
    weights file. Returns the model spec."""
    spec = ModelSpec.for_config(cfg)
    check_data(DataOptions.from_config(cfg))
    if _audit_required(cfg):  # a missing cohort row fails before training, not after
        from training.audit_run import check_cohorts, has_cohorts

        if not has_cohorts(cfg.dataset, cfg.cohorts):
            raise ConfigError(
                f"gate {cfg.gate}: max_subgroup_ratio needs a subgroup audit of the test split "
                f"and {cfg.dataset} has no cohort metadata of its own: pass --cohorts FILE.csv "
                "(see docs/commands/audit.md), or drop the criterion and gate with "
                "`medimg publish --gate` after `medimg audit`"
            )
        check_cohorts(DataOptions.from_config(cfg), cfg.cohorts)
    if cfg.pretrained_weights:
        build_model(spec.channels, spec.num_classes, cfg.pretrained_weights)
    return spec


def _train_in_run(cfg: TrainConfig, ray_name: str) -> TrainOutcome:
    import mlflow

    from training.ray_cluster import resolve_resources
    from training.ray_trainer import fit

    spec = preflight(cfg)
    if spec.task == "ordinal-regression":
        note = (
            f"{cfg.dataset} is ordinal ({len(spec.class_names)} grades); trained and "
            "evaluated as multi-class (cross-entropy, macro one-vs-rest AUC), as MedMNIST does"
        )
        log.warning("%s", note)
        mlflow.set_tag("task_note", note)
    cfg = resolve_resources(cfg)
    best = fit(cfg, ray_name)
    return finish_run(cfg, best)


def finish_run(cfg: TrainConfig, best: Best) -> TrainOutcome:
    """With an MLflow run active: calibrate on val (temperature scaling), choose the
    operating threshold on the calibrated val outputs, evaluate the best checkpoint once on
    test, log metrics and plots, register the calibrated model, apply the champion rule."""
    import mlflow

    from training.champion import promote_if_better
    from training.metrics import choose_thresholds, clinical_report
    from training.plots import log_clinical_report, log_test_plots

    spec = ModelSpec.for_config(cfg)
    val_scores = {"auc": float(best.metrics["val_auc"]), "acc": float(best.metrics["val_acc"])}
    mlflow.log_metrics(
        {
            "best_val_auc": val_scores["auc"],
            "best_val_acc": val_scores["acc"],
            "best_epoch": best.metrics["epoch"],
            **best.timing,  # Ray's start and end of this run (training.ray_trainer.ray_timing)
        }
    )
    model = build_model(spec.channels, spec.num_classes)
    model.load_state_dict(best.state)
    opts = DataOptions.from_config(cfg)
    size = dict(image_size=cfg.image_size, channels=spec.channels)
    val = open_split(opts, "val", **size)
    val_logits = predict_logits(model, val.model_input(spec.mean, spec.std))
    # The test split, touched once: the best checkpoint by val AUC; temperature and
    # threshold from val.
    test = open_split(opts, "test", **size)
    test_logits = predict_logits(model, test.model_input(spec.mean, spec.std))
    temperature, calibration = _calibrate(cfg, spec, val, val_logits, test, test_logits)

    val_probs = probabilities(val_logits, multi_label=spec.multi_label, temperature=temperature)
    positive = spec.positive_index
    thresholds = choose_thresholds(spec.task, val.labels, val_probs, positive=positive)
    probs = probabilities(test_logits, multi_label=spec.multi_label, temperature=temperature)
    scores = evaluate(spec.task, test.labels, probs)
    mlflow.log_metrics({"test_auc": scores["auc"], "test_acc": scores["acc"]})
    report = clinical_report(
        spec.task,
        test.labels,
        probs,
        thresholds,
        spec.class_names,
        seed=cfg.seed,
        positive=positive,
    )
    log_clinical_report(report)
    log_test_plots(spec, test.labels, probs, thresholds=thresholds)
    spec = spec.with_fields(
        temperature=temperature,
        thresholds=tuple(float(t) for t in np.atleast_1d(thresholds)),
        review=_review_statistics(spec, val.labels, val_probs),
    )
    audited = _audit(cfg, spec, test, probs)
    served = ProbabilityHead(model, spec.multi_label, temperature).eval()
    model_uri, version = log_and_register(served, spec, spec.model_name)
    gate, passed = _apply_gate(cfg, f"models:/{spec.model_name}/{version}")
    if passed:
        champion = promote_if_better(cfg.tracking_uri, spec.model_name, version).message
    else:
        champion = f"version {version} did not pass the gate: the champion alias was not moved"
    champion = "\n".join(filter(None, [audited, gate, champion]))
    log.info("%s", champion)
    return TrainOutcome(
        run_id=cfg.mlflow_run_id,
        model_name=spec.model_name,
        version=version,
        model_uri=model_uri,
        val=val_scores,
        test=scores,
        test_probs=probs,
        test_labels=test.labels,
        spec=spec,
        thresholds=[float(t) for t in np.atleast_1d(thresholds)],
        clinical=report.to_dict(),
        champion=champion,
        calibration=calibration,
    )


def _audit_required(cfg: TrainConfig) -> bool:
    """Whether the run must audit its test split: a cohort CSV was given or the gate
    (loaded here: a bad gate file fails before training, not after) has a subgroup criterion."""
    if not cfg.gate:
        return bool(cfg.cohorts)
    from training.gate import Gate

    return bool(cfg.cohorts) or Gate.load(cfg.gate).max_subgroup_ratio is not None


def _audit(cfg: TrainConfig, spec: ModelSpec, test, probs: np.ndarray) -> str:
    """The subgroup audit of the test split, logged to the run, when the data set has cohorts
    (a sentence for the summary, "" when none). ChestX-ray14's own metadata is audited
    unasked; a failure there is a warning unless the audit was asked for."""
    from training.audit_run import audit_in_run, has_cohorts

    if not has_cohorts(cfg.dataset, cfg.cohorts):
        return ""
    try:
        flagged = audit_in_run(cfg, spec, test, probs).get("flagged", [])
    except MedimgError as exc:
        if _audit_required(cfg):
            raise
        log.warning("subgroup audit skipped: %s", exc)
        return ""
    where = f"audit/{cfg.dataset}/"
    if not flagged:
        return f"subgroup audit: no cohort outside seismometer's fine band ({where})"
    return f"subgroup audit: {len(flagged)} cohort metric(s) flagged, see {where}audit.md"


def _apply_gate(cfg: TrainConfig, registered: str) -> tuple[str, bool]:
    """(the gate's decision as printed, whether the version may become champion); without
    ``cfg.gate``: ("", True). The decision and its numbers are logged to the run."""
    if not cfg.gate:
        return "", True
    from training.gate import Gate, check_version

    decision = check_version(Gate.load(cfg.gate), cfg.tracking_uri, registered)
    return decision.message, decision.passed


def _calibrate(cfg: TrainConfig, spec: ModelSpec, val, val_logits, test, test_logits):
    """(temperature, report dict): fitted on val by NLL, reported before/after on test and
    logged (metrics, tables, reliability diagram); ((), {}) with ``calibration="none"``."""
    import mlflow

    if cfg.calibration == "none":
        mlflow.set_tag("calibration", "none")
        return (), {}
    from training.calibration import calibrate
    from training.reliability import log_calibration, reliability_figure

    temperature, report = calibrate(
        spec.task, val_logits, val.labels, test_logits, test.labels, seed=cfg.seed
    )
    before = probabilities(test_logits, multi_label=spec.multi_label)
    after = probabilities(test_logits, multi_label=spec.multi_label, temperature=temperature)
    log_calibration(report, reliability_figure(spec.task, test.labels, before, after))
    mlflow.set_tag("calibration", "temperature")
    return tuple(float(t) for t in temperature), report.to_dict()


def _review_statistics(spec: ModelSpec, labels: np.ndarray, probs: np.ndarray) -> dict:
    """Learn-then-Test statistics of the calibrated val outputs (single-label tasks)."""
    if spec.multi_label:
        return {}
    from training.review import review_statistics

    return review_statistics(spec.task, labels, probs, spec.class_names)
