"""What ``medimg train --resume`` continues: an MLflow run id of a medimg training run, a Ray
Train run directory, or a checkpoint directory (a new run from those weights and optimizer
state); the config is the logged one with the command line's overrides::

    medimg train --resume 3f2a...c9   # the MLflow run id printed by medimg train
    medimg train --resume ~/ray_results/pneumoniamnist-20261203-101500-ab12cd --epochs 6
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.errors import ConfigError

CONFIG_ARTIFACT = "config/train_config.json"


@dataclass
class ResumeTarget:
    mlflow_run_id: str  # "" starts a new MLflow run
    ray_run_name: str
    storage_path: str
    checkpoint: str = ""  # a checkpoint directory to start a new Ray run from


def _logged_config(tracking_uri: str, run_id: str) -> dict[str, Any]:
    import mlflow

    try:
        return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{CONFIG_ARTIFACT}"))
    except Exception as exc:
        raise ConfigError(
            f"resume: MLflow run {run_id} at {tracking_uri} has no {CONFIG_ARTIFACT} "
            f"(was it started by medimg train?): {exc}"
        ) from exc


def resume_config(
    tracking_uri: str, resume: str, overrides: dict[str, Any]
) -> tuple[TrainConfig, ResumeTarget]:
    """The config and the run to continue for ``--resume``: an MLflow run id of a medimg
    training run, a Ray Train run directory, or a checkpoint directory (which starts a new
    run from those weights and optimizer state). ``overrides`` (e.g. more epochs) win."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    path = Path(resume).expanduser()
    if re.fullmatch(r"[0-9a-f]{32}", resume) and not path.exists():
        try:
            run = client.get_run(resume)
        except Exception as exc:
            raise ConfigError(f"resume: no MLflow run {resume} at {tracking_uri}: {exc}") from exc
        base = _logged_config(tracking_uri, resume)
        tags = run.data.tags
        target = ResumeTarget(resume, tags["ray_run_name"], tags["ray_storage_path"])
    elif (path / "model.pt").is_file() and (path / "train_state.pt").is_file():
        base, target = {}, ResumeTarget("", "", "", checkpoint=str(path.resolve()))
    elif path.is_dir() and any(path.glob("checkpoint_*")):
        name, storage = path.resolve().name, str(path.resolve().parent)
        runs = mlflow.search_runs(
            search_all_experiments=True,
            filter_string=f"tags.ray_run_name = '{name}'",
            output_format="list",
        )
        base = _logged_config(tracking_uri, runs[0].info.run_id) if runs else {}
        target = ResumeTarget(runs[0].info.run_id if runs else "", name, storage)
    else:
        raise ConfigError(
            f"resume: {resume!r} is neither an MLflow run id, a Ray Train run directory "
            "(with checkpoint_* folders) nor a checkpoint directory (model.pt + train_state.pt)"
        )
    values = {**base, **overrides, "tracking_uri": tracking_uri}
    if target.checkpoint:
        values["resume_from"] = target.checkpoint
    if target.storage_path:
        values["storage_path"] = target.storage_path
    return TrainConfig.from_dict(values), target
