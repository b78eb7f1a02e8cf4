"""Bookkeeping of ``medimg tune``: one MLflow child run per Tune trial under the job's
parent run (tag ``mlflow.parentRunId``), found again by its ``ray_trial_id`` tag when a
resumed job restarts the trial and closed by a Tune callback in the driver; the parent
run's final status; the job's state file; the summary of the trials::

    python -c "from training.tune_runs import JobRef; \
print(JobRef('p', '0', 'sqlite:///x.db', 'job', '/tmp/job/train', ['lr']))"
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback

from training import progress
from training.config import TrainConfig
from training.errors import MedimgError, TrainingError

log = logging.getLogger(__name__)
TRIAL_TAG = "ray_trial_id"


class TuneInterrupted(TrainingError):
    """The job stopped before all trials ended (Ctrl-C); its state is saved for --resume."""


@dataclass
class JobRef:
    """What a trial (in a Ray worker) and the driver's callback need to know of the job."""

    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    name: str  # the Tune experiment name
    train_storage: str  # each trial's Ray Train run is <train_storage>/<trial id>
    tuned: list[str] = field(default_factory=list)


def _client(ref: JobRef):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=ref.tracking_uri)


def _children(ref: JobRef, extra: str = "") -> list:
    where = f"tags.`mlflow.parentRunId` = '{ref.parent_run_id}'" + (
        f" and {extra}" if extra else ""
    )
    return _client(ref).search_runs([ref.experiment_id], filter_string=where, max_results=10000)


def child_run_ids(ref: JobRef) -> dict[str, str]:
    """Trial id -> child run id."""
    return {
        r.data.tags[TRIAL_TAG]: r.info.run_id for r in _children(ref) if TRIAL_TAG in r.data.tags
    }


def open_child_run(ref: JobRef, cfg: TrainConfig, trial_id: str, trial_name: str) -> str:
    """The trial's child run: reopened when the trial ran before (a resumed job), else
    created with the trial's params, its full config and where its Ray Train run lives."""
    from mlflow.entities import Param

    from training.driver import NOT_LOGGED
    from training.resume import CONFIG_ARTIFACT

    client = _client(ref)
    found = _children(ref, f"tags.{TRIAL_TAG} = '{trial_id}'")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "resumed_at", time.strftime("%Y-%m-%d %H:%M:%S"))
        return run_id
    tags = {
        "mlflow.parentRunId": ref.parent_run_id,
        TRIAL_TAG: trial_id,
        "ray_run_name": trial_id,
        "ray_storage_path": ref.train_storage,
        "dataset": cfg.dataset,
        "tuned_params": ",".join(ref.tuned),
    }
    run_id = client.create_run(ref.experiment_id, run_name=trial_name, tags=tags).info.run_id
    values = cfg.to_dict()
    params = [Param(k, str(v)) for k, v in values.items() if k not in NOT_LOGGED]
    client.log_batch(run_id, params=params)
    client.log_text(run_id, json.dumps({**values, "mlflow_run_id": ""}, indent=2), CONFIG_ARTIFACT)
    return run_id


def close_open_children(ref: JobRef, status: str, **tags: str) -> None:
    """Close the job's child runs that are still RUNNING (the job stopped or failed)."""
    try:
        client = _client(ref)
        for run in _children(ref, "attributes.status = 'RUNNING'"):
            for key, value in tags.items():
                client.set_tag(run.info.run_id, key, value)
            client.set_terminated(run.info.run_id, status)
    except Exception:  # never hide the error that brought us here
        log.exception("could not close the child runs of %s", ref.parent_run_id)


class ChildRuns(Callback):
    """Driver-side: closes each trial's child run when Tune ends the trial. A trial that
    ASHA (or the time budget) stopped before its last epoch is KILLED with the tag
    ``stopped_early``; a failed one FAILED with its error."""

    def __init__(self, ref: JobRef) -> None:
        self.ref = ref

    def _close(self, trial, status: str, **tags: str) -> None:
        try:
            found = _children(self.ref, f"tags.{TRIAL_TAG} = '{trial.trial_id}'")
            if not found:
                return  # the trial failed before it opened its run
            client, run_id = _client(self.ref), found[0].info.run_id
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            client.set_terminated(run_id, status)
        except Exception:
            log.exception("could not close the MLflow run of trial %s", trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        epoch = int(trial.last_result.get("epoch", 0) or 0)
        if epoch < int(trial.config["epochs"]):
            self._close(trial, "KILLED", stopped_early="true", stopped_at_epoch=str(epoch))
        else:
            self._close(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        error = trial.get_error() or "see the trial's error file"
        self._close(trial, "FAILED", error=str(error).strip()[-5000:])


class TrialProgress(Callback):
    """Driver-side: a progress record (trials ended and running, the best val AUC so far)
    whenever a trial starts, reports an epoch or ends."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.ended: set[str] = set()

    def _report(self, trials: list, starting: str = "") -> None:
        ended = self.ended | {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        running = sum(
            (t.status == "RUNNING" or t.trial_id == starting) and t.trial_id not in ended
            for t in trials
        )
        aucs = [_best_auc(t) for t in trials]
        best = max((a for a in aucs if a is not None), default=None)
        progress.trials(len(ended), running, max(self.total, len(trials)), best)

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._report(trials, starting=trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial, result, **info: Any) -> None:
        self._report(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.ended.add(trial.trial_id)
        self._report(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.ended.add(trial.trial_id)
        self._report(trials)


def _best_auc(trial) -> float | None:
    """The best val AUC a trial reported so far (Tune keeps the max per metric)."""
    value = (getattr(trial, "metric_analysis", None) or {}).get("val_auc", {}).get("max")
    if value is None:
        value = (trial.last_result or {}).get("val_auc")
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass
class TrialSummary:
    trial_id: str
    status: str  # done | stopped early | failed | not finished
    params: dict[str, Any]
    val_auc: float | None  # best over the trial's epochs
    epochs: int
    run_id: str


@dataclass
class TuneOutcome:
    parent_run_id: str
    path: str  # the Tune experiment folder (what --resume takes)
    trials: list[TrialSummary]
    best: TrialSummary
    registered: Any  # training.driver.TrainOutcome of the best trial
    tuned: list[str] = field(default_factory=list)

    def table(self) -> str:
        head = ["trial", *self.tuned, "val_auc", "epochs", "status"]
        rows = [
            [
                ("* " if t is self.best else "  ") + t.trial_id,
                *(_fmt(t.params.get(k)) for k in self.tuned),
                _fmt(t.val_auc),
                str(t.epochs),
                t.status,
            ]
            for t in self.trials
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]
        )

    def report(self) -> str:
        """What ``medimg tune`` prints at the end: the trials, the chosen one, its model."""
        reg = self.registered
        return "\n".join(
            [
                self.table(),
                f"best trial {self.best.trial_id}: val AUC {self.best.val_auc:.4f} "
                f"(MLflow run {self.best.run_id}, parent {self.parent_run_id})",
                f"registered: {reg.model_name} version {reg.version}",
                f"test AUC {reg.test['auc']:.4f}  ACC {reg.test['acc']:.4f}",
                *([reg.calibration["markdown"]] if reg.calibration.get("markdown") else []),
                reg.champion,
            ]
        )


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summarise(trial, result, ref: JobRef, runs: dict[str, str]) -> TrialSummary:
    frame = result.metrics_dataframe
    aucs = [] if frame is None or "val_auc" not in frame else frame["val_auc"].dropna().tolist()
    aucs = [float(a) for a in aucs if math.isfinite(a)]
    epochs = int(trial.last_result.get("epoch", 0) or 0)
    if trial.status == "ERROR":
        status = "failed"
    elif epochs >= int(trial.config["epochs"]):
        status = "done"
    else:
        status = "stopped early" if epochs else "not run"  # ASHA, or the time budget
    params = {k: trial.config.get(k) for k in ref.tuned}
    best = max(aucs, default=None)
    return TrialSummary(trial.trial_id, status, params, best, epochs, runs.get(trial.trial_id, ""))


@contextlib.contextmanager
def parent_run(ref: JobRef):
    """Close the parent run: KILLED when interrupted, FAILED on any error."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=ref.tracking_uri)
    try:
        yield client
    except (TuneInterrupted, KeyboardInterrupt):
        close_open_children(ref, "KILLED", interrupted="true")
        client.set_terminated(ref.parent_run_id, "KILLED")
        raise
    except Exception as exc:
        close_open_children(ref, "FAILED")
        client.set_tag(ref.parent_run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
        client.set_terminated(ref.parent_run_id, "FAILED")
        if isinstance(exc, MedimgError):
            raise
        raise TrainingError(f"tuning job {ref.name} failed: {type(exc).__name__}: {exc}") from exc
    client.set_terminated(ref.parent_run_id, "FINISHED")


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def write_text(path: str, text: str, endpoint: str = "") -> None:
    from training.storage import resolve

    fs, fs_path = resolve(path, endpoint)
    fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(fs_path) as out:
        out.write(text.encode())


def read_text(path: str, endpoint: str = "") -> str:
    from training.storage import resolve

    fs, fs_path = resolve(path, endpoint)
    with fs.open_input_stream(fs_path) as stream:
        return stream.readall().decode()
