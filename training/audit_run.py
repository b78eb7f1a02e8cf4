"""Cohorts of a test split, and the subgroup audit run by ``medimg train`` / ``tune``.

The cohorts of a test split: ChestX-ray14's own metadata (``training.cohorts``) and/or a
cohort CSV (``--cohorts FILE.csv``: a ``path`` column for file-based data sets, an
``index`` column -- the row in the test split -- for MedMNIST). A file-based data set's
rows are checked against the CSV before any image is decoded (a missing row fails fast,
naming the file); a MedMNIST CSV against the test split's row count.

At training time the audit runs on the test probabilities the run already computed (the
test split is touched once) when the data set has cohorts, and is logged to the run under
``audit/<dataset>/`` -- where ``medimg audit`` logs it and the gate's ``max_subgroup_ratio``
reads it::

    medimg train --dataset pneumoniamnist --cohorts cohorts.csv --gate gate.yaml
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from training.cohorts import Cohorts, chestxray14_cohorts, csv_cohorts
from training.data import FILE_DATASETS
from training.errors import ConfigError

log = logging.getLogger(__name__)
CXR14 = "chestxray14"
TRAIN_BOOTSTRAP = 500  # resamples of the audit at training time (medimg audit: 1000)


def has_cohorts(dataset: str, csv_path: str = "") -> bool:
    """Whether the test split of ``dataset`` has cohorts to audit."""
    return bool(csv_path) or dataset.lower() == CXR14


def file_cohorts(opts, csv_path: str = "") -> tuple[Cohorts | None, list[str] | None]:
    """(the cohorts of every file of the test split, their paths) for a file-based data set
    (``opts``: ``training.data.DataOptions``), read before any image is decoded; (None, None)
    for MedMNIST, whose cohorts are keyed by row once the split is open."""
    from training import chestxray14, folder

    if opts.dataset not in FILE_DATASETS:
        return None, None
    module = chestxray14 if opts.dataset == CXR14 else folder
    paths = module.split_files(opts.data_dir, "test", opts.val_fraction, opts.test_fraction).paths
    found = chestxray14_cohorts(opts.data_dir, paths) if opts.dataset == CXR14 else None
    if csv_path:
        extra = csv_cohorts(csv_path, paths, opts.data_dir, by_name=opts.dataset == CXR14)
        found = extra if found is None else found.merged(extra)
    return found, paths


def split_cohorts(split, csv_path: str, found: Cohorts | None, paths: list[str] | None) -> Cohorts:
    """The cohorts of the rows of an open test ``split`` (``training.data.ImageSplit``), from
    :func:`file_cohorts`' result (images that did not decode or were subsampled dropped) or,
    for MedMNIST, from the CSV's ``index`` column."""
    if found is None:
        if not csv_path:
            raise ConfigError("audit: this data set has no cohort metadata; pass a cohort CSV")
        return csv_cohorts(csv_path, None, n=len(split))
    if split.paths is None or paths is None:
        return found
    where = {p: i for i, p in enumerate(paths)}
    return found.take(np.array([where[p] for p in split.paths]))


def check_cohorts(opts, csv_path: str) -> None:
    """Before training: the cohort CSV (or ChestX-ray14's label file) has a row for every
    test image. Raises :class:`~training.errors.DataError` naming what is missing."""
    if not has_cohorts(opts.dataset, csv_path):
        return
    found, _ = file_cohorts(opts, csv_path)
    if found is None:  # MedMNIST: one row per test-split row
        from training.data import medmnist_arrays

        n = len(medmnist_arrays(opts.dataset, "test", opts.data_dir, opts.size)[1])
        csv_cohorts(csv_path, None, n=n)


def audit_in_run(cfg, spec, split, probs: np.ndarray) -> dict:
    """The subgroup audit of the run's test probabilities ``probs`` (rows of ``split``),
    written and logged to the active MLflow run under ``audit/<dataset>/``; returns the
    audit's JSON (the format the gate reads). ``cfg``: ``training.config.TrainConfig``."""
    import json

    from training.audit import audit
    from training.audit_report import log_audit, write_audit
    from training.data import DataOptions

    opts = DataOptions.from_config(cfg)
    found, paths = file_cohorts(opts, cfg.cohorts)
    cohorts = split_cohorts(split, cfg.cohorts, found, paths)
    result = audit(
        spec.task,
        split.labels,
        probs,
        cohorts.columns,
        patients=cohorts.patients,
        thresholds=spec.thresholds,
        positive_index=spec.positive_index if spec.task.startswith("binary") else 0,
        n_boot=TRAIN_BOOTSTRAP,
        seed=cfg.seed,
    )
    meta = {
        "title": f"{spec.model_name} (training run {cfg.mlflow_run_id}) on {cfg.dataset} "
        "(test split)",
        "sources": "; ".join(f"{c}: {s}" for c, s in cohorts.sources.items()),
        "model": f"training run {cfg.mlflow_run_id}",
        "data": f"{cfg.dataset} in {cfg.data_dir}",
    }
    with tempfile.TemporaryDirectory(prefix="medimg-audit-") as tmp:
        files = write_audit(result, Path(tmp), meta)
        log_audit(tmp, artifact_path=f"audit/{cfg.dataset}")
        data = json.loads(files["audit.json"].read_text(encoding="utf-8"))
    log.info("subgroup audit of the test split logged under audit/%s/", cfg.dataset)
    return data
