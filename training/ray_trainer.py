"""Ray Train loop for DenseNet-121, with MLflow tracking, checkpoints and fault tolerance.

The driver opens an MLflow run; Ray Train's ``TorchTrainer`` runs
:func:`train_loop_per_worker` on W workers (DDP over gloo, or NCCL on GPUs), on this
machine or a cluster (``--ray-address``). Every epoch each rank reports its metrics
and rank 0 a checkpoint (weights, optimizer, schedule, epoch); the best K by val AUC
are kept. A worker that dies is restarted from the last checkpoint
(``--max-failures``), and a stopped run continues with ``--resume``::

    medimg train --dataset pneumoniamnist --epochs 2 --max-train-samples 256 --workers 2
"""

from __future__ import annotations

import logging
import math
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from training import progress
from training.augment import BatchTransform
from training.config import TrainConfig
from training.data import DataOptions, open_split
from training.ema import WeightAverage
from training.epoch import (
    Schedule,
    make_loss,
    make_optimizer,
    make_sampler,
    run_epoch,
)
from training.errors import TrainingError
from training.metrics import evaluate
from training.mix import BatchMixer
from training.model import build_model, load_weights, predict_proba, save_weights, unwrap
from training.precision import resolve as resolve_precision
from training.ray_cluster import resolve_resources
from training.spec import ModelSpec
from training.worker_logs import relay_to_driver

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "model.pt"
STATE_FILE = "train_state.pt"
METRIC_KEYS = (
    "train_loss",
    "val_auc",
    "val_acc",
    "epoch_time_s",
    "train_time_s",
    "train_images_per_s",
    "data_wait_s",
    "val_time_s",
    "lr",
)


def _gather_probs(model: nn.Module, x: np.ndarray, spec: ModelSpec, rank: int, world: int):
    """Each rank predicts rank::world of ``x``; every rank gets all predictions back."""
    idx = np.arange(rank, len(x), world)
    probs = predict_proba(model, x[idx], multi_label=spec.multi_label) if len(idx) else None
    if world == 1:
        return probs
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, (idx, probs))
    out = np.empty((len(x), spec.num_classes), dtype=np.float32)
    for part_idx, part_probs in parts:
        if len(part_idx):
            out[part_idx] = part_probs
    return out


class _MlflowEpochs:
    """Rank 0's per-epoch metrics into the driver's MLflow run, each epoch exactly once."""

    def __init__(self, cfg: TrainConfig) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        self.run_id = cfg.mlflow_run_id

    def logged_epochs(self) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, "val_auc")}

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log ``epoch`` unless the run has it: a stop between MLflow's log and Ray keeping
        that epoch's checkpoint makes the resumed run train the epoch again."""
        from mlflow.entities import Metric

        if epoch in self.logged_epochs():
            log.warning(
                "epoch %d is already in MLflow run %s (logged before the stop, whose "
                "checkpoint was not kept); its first values stay",
                epoch,
                self.run_id,
            )
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(metrics[k]), now, epoch) for k in METRIC_KEYS if k in metrics]
        self.client.log_batch(self.run_id, metrics=batch)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)


def _restore(checkpoint, model, optimizer, schedule, scaler) -> tuple[int, dict, Any]:
    """Load a checkpoint's weights and training state; return (its epoch, its metrics, the
    weight average to continue: (its weights, its state), or None)."""
    with checkpoint.as_directory() as d:
        weights = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    average = None
    if state.get("ema"):  # model.pt holds the average; the trained weights are in the state
        average = weights["state_dict"], state["ema"]
        unwrap(model).load_state_dict(state["model"])
    else:
        unwrap(model).load_state_dict(weights["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), dict(state["metrics"]), average


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: train to ``epochs``, resuming from a checkpoint when there is one."""
    import ray.train
    import ray.train.torch

    loop_started_at, setup_started = time.time(), time.perf_counter()
    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    relay_to_driver(rank)  # our log records reach the driver as records, not as text
    if cfg.cpus_per_worker >= 1:
        torch.set_num_threads(int(cfg.cpus_per_worker))
    torch.manual_seed(cfg.seed + rank)
    spec = ModelSpec.for_config(cfg)
    opts = DataOptions.from_config(cfg)
    size = dict(image_size=cfg.image_size, channels=spec.channels)
    train = open_split(opts, "train", max_samples=cfg.max_train_samples, **size)
    val = open_split(opts, "val", **size)
    val_y, val_x = val.labels, val.model_input(spec.mean, spec.std)
    sampler = make_sampler(cfg, train.labels, train, rank, world)
    loader = DataLoader(
        train, batch_size=cfg.batch_size, sampler=sampler, drop_last=len(train) > cfg.batch_size
    )
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg, device)
    model = ray.train.torch.prepare_model(
        build_model(spec.channels, spec.num_classes, cfg.pretrained_weights).to(
            memory_format=precision.memory_format
        )
    )
    optimizer = make_optimizer(cfg, model.parameters())
    schedule = Schedule(cfg, optimizer)
    autocast, scaler = precision.autocast(), precision.scaler()
    loss_fn = make_loss(cfg, spec, train.labels).to(device)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    transform = BatchTransform(cfg.augmentations, cfg.aug_strength, spec.mean, spec.std, generator)
    mixer = BatchMixer(cfg.mixup_alpha, cfg.cutmix_alpha, seed=cfg.seed * 1000 + rank)
    tracker = _MlflowEpochs(cfg) if rank == 0 and cfg.mlflow_run_id else None

    start, average = 1, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.resume_from:
        checkpoint = ray.train.Checkpoint(cfg.resume_from)
    if checkpoint is not None:
        done, done_metrics, average = _restore(checkpoint, model, optimizer, schedule, scaler)
        start = done + 1
        if rank == 0:
            log.info(
                "resumed from %s: epoch %d done, continuing at %d", checkpoint.path, done, start
            )
        if tracker is not None and done not in tracker.logged_epochs():
            tracker.log(done, done_metrics)  # killed between checkpoint and MLflow log
    ema = WeightAverage(unwrap(model), cfg.ema_decay) if cfg.ema_decay else None
    if ema is not None and average is not None:
        ema.load(*average)
    evaluated = ema.module if ema is not None else model  # validated, checkpointed, exported
    here = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    hosts: list[Any] = [here] * world
    if world > 1:
        torch.distributed.all_gather_object(hosts, here)
    if tracker is not None:
        tracker.tag("ray_worker_nodes", ",".join(hosts))
        tracker.tag("train_precision", precision.name)
    # where a run's time goes outside its epochs (benchmarks/train_overhead.py reads these)
    timing = {"loop_started_at": loop_started_at, "setup_s": time.perf_counter() - setup_started}

    for epoch in range(start, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        started = time.perf_counter()

        def on_step(
            step: int, steps: int, loss: float, seen: int, epoch=epoch, started=started
        ) -> None:
            if ema is not None:
                ema.update(unwrap(model))
            if rank == 0 and (step % 25 == 0 or step == steps):
                seconds = time.perf_counter() - started
                rate = seen * world / seconds
                progress.step(epoch, cfg.epochs, step, steps, loss, rate, seconds)

        stats = run_epoch(
            model,
            loader,
            transform=lambda x: transform(x, train=True),
            loss_fn=loss_fn,
            optimizer=optimizer,
            spec=spec,
            device=device,
            autocast=autocast,
            scaler=scaler,
            memory_format=precision.memory_format,
            on_step=on_step,
            mixer=mixer if mixer.active else None,
        )
        sums = torch.tensor([stats.loss_sum, stats.images], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(sums)  # on the device: NCCL reduces GPU tensors only
        val_started = time.perf_counter()
        probs = _gather_probs(evaluated, val_x, spec, rank, world)
        scores = evaluate(spec.task, val_y, probs)
        metrics = {
            **timing,
            "val_time_s": time.perf_counter() - val_started,
            "epoch": epoch,
            "train_loss": float(sums[0] / sums[1]),
            "val_auc": scores["auc"] if math.isfinite(scores["auc"]) else 0.0,
            "val_acc": scores["acc"],
            "epoch_time_s": time.perf_counter() - started,
            "train_time_s": stats.seconds,
            "train_images_per_s": float(sums[1]) / stats.seconds,
            "lr": optimizer.param_groups[0]["lr"],
            "data_wait_s": stats.load_seconds,
        }
        schedule.step(metrics["val_auc"])
        if rank != 0:
            ray.train.report(metrics)
            continue
        progress.epoch(
            epoch,
            cfg.epochs,
            train_loss=metrics["train_loss"],
            val_auc=metrics["val_auc"],
            val_acc=metrics["val_acc"],
            images_per_s=metrics["train_images_per_s"],
            seconds=metrics["epoch_time_s"],
        )
        with tempfile.TemporaryDirectory() as tmp:
            save_weights(evaluated, Path(tmp) / CHECKPOINT_FILE, spec.to_json())
            state = {
                "epoch": epoch,
                "metrics": metrics,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
            }
            if ema is not None:  # model.pt holds the average; resume needs the trained weights
                state.update(ema=ema.state_dict(), model=unwrap(model).state_dict())
            torch.save(state, Path(tmp) / STATE_FILE)
            metrics["reported_at"] = time.time()  # fit() times the end of the run from this
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if tracker is not None:  # after the checkpoint is safe: a restart re-logs if needed
            tracker.log(epoch, metrics)


def build_trainer(cfg: TrainConfig, run_name: str, *, callbacks: list | None = None):
    """The configured ``TorchTrainer``. Reusing ``run_name`` under the same storage path
    continues that run from its latest checkpoint (Ray Train's own resume)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.storage import ray_storage

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker or 1.0
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            **ray_storage(cfg.storage_path, cfg.storage_endpoint).kwargs(),
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute="val_auc",
                checkpoint_score_order="max",
            ),
        ),
    )


@dataclass
class Best:
    """The checkpoint with the highest val AUC: its reported metrics and its weights."""

    metrics: dict[str, Any]
    state: dict[str, torch.Tensor]
    # Ray's share of the run's wall time outside the epochs, by phase (seconds)
    timing: dict[str, float] = field(default_factory=dict)


def best_from_result(result) -> Best:
    """The best checkpoint by val AUC of a finished Train run, its weights read into memory
    (a checkpoint on remote storage is downloaded to a directory Ray removes afterwards)."""
    if not result.best_checkpoints:
        raise TrainingError(f"training run at {result.path} reported no checkpoint")
    checkpoint, metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["val_auc"])
    with checkpoint.as_directory() as ckpt_dir:
        state, _ = load_weights(Path(ckpt_dir) / CHECKPOINT_FILE)
    return Best(metrics=dict(metrics), state=state)


def ray_timing(result, fit_started: float, fit_ended: float) -> dict[str, float]:
    """Where Ray's fixed cost went in a finished run, from the worker's timestamps:
    ``ray_worker_start_s`` (fit() until the loop function ran: controller, placement,
    worker process, imports) and ``ray_run_end_s`` (the last report until fit() returned:
    the controller noticing the end, stopping workers)."""
    latest = result.metrics or {}
    rows = [metrics for _, metrics in result.best_checkpoints or []] + [latest]
    # a resumed run's older checkpoints carry the previous fit()'s start
    starts = [m["loop_started_at"] for m in rows if m.get("loop_started_at", 0) >= fit_started]
    if not starts or "reported_at" not in latest:
        return {}
    return {
        "ray_worker_start_s": min(starts) - fit_started,
        "ray_run_end_s": fit_ended - latest["reported_at"],
    }


def fit(cfg: TrainConfig, run_name: str) -> Best:
    """Run (or continue) the Ray Train run ``run_name``; return its best checkpoint."""
    cfg = resolve_resources(cfg)
    trainer = build_trainer(cfg, run_name)
    fit_started = time.time()
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors in its own types
        raise TrainingError(f"training failed: {type(exc).__name__}: {exc}") from exc
    fit_ended = time.time()
    best = best_from_result(result)
    best.timing = ray_timing(result, fit_started, fit_ended)
    return best
