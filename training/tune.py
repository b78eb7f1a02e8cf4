"""``medimg tune``: Ray Tune over Ray Train trials, tracked as MLflow parent and child runs.

Every trial is a full ``TorchTrainer`` run (``--workers`` per trial) of the base config
with the searched fields overridden; Optuna's TPE (or random search) proposes them,
ASHA stops poor trials after each epoch. MLflow gets one parent run per job and one child
run per trial (``mlflow.parentRunId``); the trial with the best val AUC is evaluated once
on the test split and registered from its child run. An interrupted job continues with
``--resume`` and re-runs no finished trial::

    medimg tune --dataset pneumoniamnist --samples 8 --epochs 4 --max-train-samples 1024
    medimg tune --resume ray_results/tune-pneumoniamnist-20250101-120000-abc123
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.config import TrainConfig
from training.console import announce_run_dir
from training.errors import ConfigError, TrainingError
from training.search_space import DEFAULT_AUGMENT, DEFAULT_SPACE, load_space, parse_space
from training.storage import RayStorage, ray_storage
from training.tune_runs import (
    ChildRuns,
    JobRef,
    TrialProgress,
    TuneInterrupted,
    TuneOutcome,
    join,
    open_child_run,
    parent_run,
    read_text,
    summarise,
    write_text,
)

if TYPE_CHECKING:
    from ray.tune.search import SearchAlgorithm, Searcher

log = logging.getLogger(__name__)
STATE_FILE = "medimg_tune.json"
SEARCHES = ("optuna", "random")
SCHEDULERS = ("asha", "none")


@dataclass
class TuneSettings:
    samples: int = 8
    max_concurrent: int = 1
    search: str = "optuna"
    trial_scheduler: str = "asha"  # --scheduler is the LR schedule
    time_budget_s: float = 0.0  # 0: no limit
    space_file: str = ""  # "" searches DEFAULT_SPACE
    name: str = ""  # the Tune experiment folder under --storage-path; "" picks a new one

    def validate(self) -> None:
        checks = [
            (self.samples >= 1, "samples", ">= 1", self.samples),
            (self.max_concurrent >= 1, "max_concurrent", ">= 1", self.max_concurrent),
            (self.search in SEARCHES, "search", f"one of {list(SEARCHES)}", self.search),
            (
                self.trial_scheduler in SCHEDULERS,
                "trial_scheduler",
                f"one of {list(SCHEDULERS)}",
                self.trial_scheduler,
            ),
            (self.time_budget_s >= 0, "time_budget_s", ">= 0", self.time_budget_s),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise ConfigError(f"tune {name}: expected {expected}, got {got!r}")


def _trial(config: dict[str, Any], job: dict[str, Any]) -> None:
    """One Tune trial: a ``TorchTrainer`` run whose reports reach Tune through Train V2's
    ``TuneReportCallback``; its rank 0 logs per-epoch metrics into the trial's child run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from training.ray_trainer import build_trainer

    ref = JobRef(**job)
    ctx = ray.tune.get_context()
    cfg = TrainConfig.from_dict({**config, "storage_path": ref.train_storage})
    cfg.mlflow_run_id = open_child_run(ref, cfg, ctx.get_trial_id(), ctx.get_trial_name())
    build_trainer(cfg, ctx.get_trial_id(), callbacks=[TuneReportCallback()]).fit()


def _trainable(ref: JobRef):
    import ray.tune

    # The trial driver needs no CPU (its TorchTrainer reserves the workers' own); a
    # resource request cannot be empty, so it asks for 1 MB of memory.
    driver = ray.tune.PlacementGroupFactory([{"memory": 1e6}])
    return ray.tune.with_resources(ray.tune.with_parameters(_trial, job=asdict(ref)), driver)


def _init_ray(cfg: TrainConfig, max_concurrent: int) -> TrainConfig:
    """Start or join Ray; share the CPUs between ``max_concurrent`` trials of W workers."""
    import ray

    from training.ray_cluster import init_ray, resolve_resources

    if not ray.is_initialized():
        init_ray(cfg)
    total = ray.cluster_resources().get("CPU", 1)
    need = cfg.workers * max_concurrent
    if not cfg.cpus_per_worker:
        if total < need:
            raise ConfigError(
                f"--max-concurrent {max_concurrent} x --workers {cfg.workers} needs {need} CPUs; "
                f"the Ray cluster has {total:g}: lower one of them"
            )
        cfg.cpus_per_worker = float(total // need)
    elif not cfg.ray_address and cfg.cpus_per_worker * need > total:
        raise ConfigError(
            f"--max-concurrent {max_concurrent} x --workers {cfg.workers} x --cpus-per-worker "
            f"{cfg.cpus_per_worker:g} needs {cfg.cpus_per_worker * need:g} CPUs; this machine has {total:g}"
        )
    return resolve_resources(cfg)


def _tuner(ref: JobRef, base: TrainConfig, space: dict, settings: TuneSettings):
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    search: Searcher | SearchAlgorithm
    if settings.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=base.seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # An explicit generator ignores TuneConfig.max_concurrent_trials: give it here.
        search = BasicVariantGenerator(
            random_state=base.seed, max_concurrent=settings.max_concurrent
        )
    scheduler = FIFOScheduler()
    if (
        settings.trial_scheduler == "asha"
    ):  # a rung after epoch 1, 2, 4, ...: the better half goes on
        scheduler = ASHAScheduler(
            time_attr="epoch", max_t=base.epochs, grace_period=1, reduction_factor=2
        )
    return ray.tune.Tuner(
        _trainable(ref),
        param_space={**base.to_dict(), **{k: p.to_tune() for k, p in space.items()}},
        tune_config=ray.tune.TuneConfig(
            metric="val_auc",
            mode="max",
            search_alg=search,
            scheduler=scheduler,
            num_samples=settings.samples,
            max_concurrent_trials=settings.max_concurrent,
            time_budget_s=settings.time_budget_s or None,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=ref.name,
            **ray_storage(base.storage_path, base.storage_endpoint).kwargs(),
            callbacks=[ChildRuns(ref), TrialProgress(settings.samples)],
        ),
    )


def _trial_dirname(trial) -> str:
    return trial.trial_id


def run_tune(base: TrainConfig, settings: TuneSettings) -> TuneOutcome:
    """Start a tuning job: parent run, search space, trials, the best trial registered."""
    from mlflow import MlflowClient

    from training.registry import ensure_experiment

    settings.validate()
    name = (
        settings.name
        or f"tune-{base.dataset}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    path = join(base.storage_path, name)
    announce_run_dir(log, path)
    experiment_id = ensure_experiment(base.tracking_uri, base.experiment)
    parent = MlflowClient(tracking_uri=base.tracking_uri).create_run(
        experiment_id,
        run_name=name,
        tags={"medimg_job": "tune", "dataset": base.dataset, "ray_tune_path": path},
    )
    ref = JobRef(
        parent.info.run_id, experiment_id, base.tracking_uri, name, join(path, "train"), []
    )
    with parent_run(ref) as client:
        raw = load_space(settings.space_file) if settings.space_file else DEFAULT_SPACE
        client.log_text(ref.parent_run_id, json.dumps(raw, indent=2), "tune/search_space.json")
        space = parse_space(raw, base)
        ref.tuned = list(space)
        if "aug_strength" in space and "augment" not in space and not base.augment:
            base = replace(base, augment=DEFAULT_AUGMENT)
            log.info("searching aug_strength: trials augment with %r", DEFAULT_AUGMENT)
        from training.driver import NOT_LOGGED, preflight

        preflight(base)  # fail in the driver, not in every trial
        base = _init_ray(base, settings.max_concurrent)

        params = {k: v for k, v in base.to_dict().items() if k not in {*NOT_LOGGED, *space}}
        params.update({f"tune.{k}": v for k, v in asdict(settings).items()})
        params.update({f"space.{k}": p.describe().split(": ", 1)[1] for k, p in space.items()})
        for key, value in params.items():
            client.log_param(ref.parent_run_id, key, value)
        state = {"ref": asdict(ref), "settings": asdict(settings), "base": base.to_dict()}
        write_text(join(path, STATE_FILE), json.dumps(state, indent=2), base.storage_endpoint)
        log.info("tuning job %s; if stopped, continue with: medimg tune --resume %s", name, path)
        started = time.monotonic()
        results = _tuner(ref, base, space, settings).fit()
        storage = ray_storage(path, base.storage_endpoint)
        _check_complete(storage, settings, time.monotonic() - started)
        return _conclude(results, ref, path, client)


def resume_tune(path: str, endpoint: str = "") -> TuneOutcome:
    """Continue an interrupted job from its Tune experiment folder; finished trials stay.
    ``endpoint``: the S3-compatible endpoint of an ``s3://`` folder (``training.storage``)."""
    import ray.tune

    path = str(Path(path).expanduser().resolve()) if "://" not in path else path.rstrip("/")
    try:
        state = json.loads(read_text(join(path, STATE_FILE), endpoint))
    except (OSError, FileNotFoundError) as exc:
        raise ConfigError(
            f"resume: {path} is not a medimg tuning job folder (no {STATE_FILE}): {exc}"
        ) from exc
    announce_run_dir(log, path)  # a job folder: its log file continues there
    ref, settings = JobRef(**state["ref"]), TuneSettings(**state["settings"])
    base = TrainConfig.from_dict(state["base"])
    with parent_run(ref) as client:
        client.update_run(ref.parent_run_id, status="RUNNING")
        client.set_tag(ref.parent_run_id, "resumed_at", time.strftime("%Y-%m-%d %H:%M:%S"))
        _init_ray(base, settings.max_concurrent)
        storage = ray_storage(path, endpoint or base.storage_endpoint)
        fs = storage.filesystem
        if not ray.tune.Tuner.can_restore(storage.path, storage_filesystem=fs):
            raise ConfigError(f"resume: {path} holds no Tune experiment state to restore")
        tuner = ray.tune.Tuner.restore(
            storage.path, trainable=_trainable(ref), resume_errored=True, storage_filesystem=fs
        )
        started = time.monotonic()
        results = tuner.fit()
        _check_complete(storage, settings, time.monotonic() - started)
        return _conclude(results, ref, path, client)


def _check_complete(storage: RayStorage, settings: TuneSettings, elapsed: float) -> None:
    """Raise :class:`TuneInterrupted` when the saved experiment state (what ``--resume``
    continues) still has live trials, or fewer than asked for while time was left."""
    import ray.tune

    path = storage.path
    saved = ray.tune.ExperimentAnalysis(path, storage_filesystem=storage.filesystem).trials
    live = [t for t in saved if t.status not in ("TERMINATED", "ERROR")]
    budget_spent = bool(settings.time_budget_s) and elapsed >= settings.time_budget_s
    if live or (len(saved) < settings.samples and not budget_spent):
        done = len(saved) - len(live)
        raise TuneInterrupted(
            f"tuning job interrupted with {done} of {settings.samples} trial(s) ended; its state "
            f"is saved: continue with `medimg tune --resume {path}`"
        )


def _conclude(results, ref: JobRef, path: str, client) -> TuneOutcome:
    """Summarise the trials, register the best one from its child run, log it to the parent."""
    import mlflow
    import ray.train

    from training.driver import finish_run
    from training.ray_trainer import best_from_result
    from training.tune_runs import child_run_ids

    runs = child_run_ids(ref)
    trials = results._experiment_analysis.trials  # ResultGrid's own order (one per trial)
    summaries = [summarise(t, r, ref, runs) for t, r in zip(trials, results, strict=True)]
    scored = [s for s in summaries if s.val_auc is not None]
    if not scored:
        errors = "; ".join(str(r.error).strip().splitlines()[-1] for r in results if r.error)
        raise TrainingError(f"no trial of {ref.name} reported a val AUC: {errors or 'none ran'}")
    best = max(scored, key=lambda s: s.val_auc or 0.0)  # all scored: none is None
    trial = next(t for t in trials if t.trial_id == best.trial_id)
    cfg = TrainConfig.from_dict({**trial.config, "storage_path": ref.train_storage})
    cfg.mlflow_run_id = best.run_id
    chosen = best_from_result(ray.train.Result.from_path(join(ref.train_storage, best.trial_id)))
    mlflow.set_tracking_uri(ref.tracking_uri)
    with mlflow.start_run(run_id=best.run_id):
        registered = finish_run(cfg, chosen)
    client.log_metric(ref.parent_run_id, "best_val_auc", best.val_auc)
    client.log_metric(ref.parent_run_id, "best_test_auc", registered.test["auc"])
    for key in ref.tuned:
        client.set_tag(ref.parent_run_id, f"best.{key}", str(best.params.get(key)))
    client.set_tag(ref.parent_run_id, "best_trial_id", best.trial_id)
    client.set_tag(ref.parent_run_id, "best_run_id", best.run_id)
    client.set_tag(ref.parent_run_id, "registered", f"{registered.model_name}/{registered.version}")
    outcome = TuneOutcome(ref.parent_run_id, path, summaries, best, registered, ref.tuned)
    client.log_text(ref.parent_run_id, outcome.table(), "tune/trials.txt")
    return outcome
