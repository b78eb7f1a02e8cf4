"""Ray Train loop for DenseNet-121 on MedMNIST, with MLflow tracking.

The driver opens an MLflow run, Ray Train's ``TorchTrainer`` runs
:func:`train_loop_per_worker` on W workers (DDP over gloo, or NCCL on GPUs),
rank 0 logs per-epoch metrics into that run, every epoch reports a checkpoint,
the best one by val AUC is evaluated once on the test split and registered::

    medimg train --dataset pneumoniamnist --epochs 1 --max-train-samples 256 --workers 2
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from training.config import TrainConfig
from training.data import dataset_info, prepare_split
from training.metrics import evaluate
from training.model import build_model, predict_proba, save_weights
from training.spec import ModelSpec

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "model.pt"


def _loss_fn(spec: ModelSpec) -> nn.Module:
    return nn.BCEWithLogitsLoss() if spec.multi_label else nn.CrossEntropyLoss()


def _targets(spec: ModelSpec, y: torch.Tensor) -> torch.Tensor:
    return y.float() if spec.multi_label else y[:, 0].long()


def _gather_probs(
    model: nn.Module, x: np.ndarray, spec: ModelSpec, rank: int, world: int
) -> np.ndarray:
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: train ``epochs`` epochs, report metrics and a checkpoint each."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(config)
    log.setLevel(logging.INFO)  # Ray Train V2 shows worker log records once (prints twice)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.cpus_per_worker >= 1:
        torch.set_num_threads(int(cfg.cpus_per_worker))
    torch.manual_seed(cfg.seed)
    spec = ModelSpec.for_dataset(cfg.dataset, cfg.image_size)

    train = prepare_split(
        cfg.dataset,
        "train",
        cfg.data_dir,
        size=cfg.size,
        image_size=cfg.image_size,
        max_samples=cfg.max_train_samples,
        seed=cfg.seed,
    )
    val = prepare_split(cfg.dataset, "val", cfg.data_dir, size=cfg.size, image_size=cfg.image_size)
    dataset = TensorDataset(torch.from_numpy(train.x), torch.from_numpy(train.y))
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=len(dataset) > cfg.batch_size
    )

    model = ray.train.torch.prepare_model(build_model(spec.channels, spec.num_classes))
    device = ray.train.torch.get_device()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    loss_fn = _loss_fn(spec)
    mlflow_client = None
    if rank == 0 and cfg.mlflow_run_id:
        from mlflow import MlflowClient

        mlflow_client = MlflowClient(tracking_uri=cfg.tracking_uri)

    steps = len(loader)
    for epoch in range(1, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        model.train()
        started, total, count = time.perf_counter(), 0.0, 0
        for step, (x, y) in enumerate(loader, start=1):
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), _targets(spec, y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(x)
            count += len(x)
            if rank == 0 and (step % 25 == 0 or step == steps):
                rate = count * world / (time.perf_counter() - started)
                log.info(
                    "epoch %d/%d step %d/%d loss %.4f %.0f img/s",
                    epoch,
                    cfg.epochs,
                    step,
                    steps,
                    total / count,
                    rate,
                )
        scheduler.step()
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(sums)  # on the device: NCCL reduces GPU tensors only
        train_loss = float(sums[0] / sums[1])

        probs = _gather_probs(model, val.x, spec, rank, world)
        scores = evaluate(spec.task, val.y, probs)
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_auc": scores["auc"] if math.isfinite(scores["auc"]) else 0.0,
            "val_acc": scores["acc"],
            "epoch_time_s": time.perf_counter() - started,
        }
        if rank == 0:
            log.info(
                "epoch %d/%d train_loss %.4f val_auc %.4f val_acc %.4f",
                epoch,
                cfg.epochs,
                train_loss,
                metrics["val_auc"],
                metrics["val_acc"],
            )
            if mlflow_client is not None:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                mlflow_client.log_batch(
                    cfg.mlflow_run_id,
                    metrics=[
                        Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"
                    ],
                )
            with tempfile.TemporaryDirectory() as tmp:
                save_weights(model, Path(tmp) / CHECKPOINT_FILE, spec.to_json())
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def resolve_resources(cfg: TrainConfig) -> TrainConfig:
    """Start or join Ray, then fill in CPUs per worker and GPU use: GPUs when CUDA exists,
    else the cluster's CPUs shared between the workers."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True, configure_logging=False)
    cfg.use_gpu = cfg.use_gpu or torch.cuda.is_available()
    if not cfg.cpus_per_worker:
        total = int(ray.cluster_resources().get("CPU", 1))
        cfg.cpus_per_worker = float(max(1, total // cfg.workers))
    return cfg


@dataclass
class Best:
    """The checkpoint with the highest val AUC: its reported metrics and a local weights file."""

    metrics: dict[str, Any]
    weights: Path


def fit(cfg: TrainConfig) -> Best:
    """Run the TorchTrainer; return the best checkpoint by val AUC."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.errors import TrainingError

    dataset_info(cfg.dataset)  # fail fast on an unknown name
    cfg = resolve_resources(cfg)
    workers, cpus, use_gpu = cfg.workers, cfg.cpus_per_worker, cfg.use_gpu
    run_name = f"{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=cfg.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute="val_auc",
                checkpoint_score_order="max",
            ),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors in its own types
        raise TrainingError(f"training failed: {type(exc).__name__}: {exc}") from exc
    if not result.best_checkpoints:
        raise TrainingError(f"training run {run_name} reported no checkpoint")
    checkpoint, metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["val_auc"])
    with checkpoint.as_directory() as ckpt_dir:
        local = Path(tempfile.mkdtemp(prefix="medimg-best-")) / CHECKPOINT_FILE
        local.write_bytes((Path(ckpt_dir) / CHECKPOINT_FILE).read_bytes())
    return Best(metrics=dict(metrics), weights=local)
