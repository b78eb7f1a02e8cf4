"""The pieces of one training epoch, shared by the Ray Train worker loop and the plain
PyTorch loop of ``benchmarks/train_overhead.py``: loss with class weighting, optimizer,
LR schedule, the (optionally class-balanced) distributed sampler, one epoch (its precision
comes from ``training.precision``)::

    python -c "import numpy as np; from training.epoch import balanced_weights; \
print(balanced_weights(np.array([[0], [0], [0], [1]]), 2, multi_label=False))"
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from training.config import TrainConfig
from training.errors import ConfigError
from training.mix import BatchMixer, mixed_loss
from training.spec import ModelSpec

log = logging.getLogger(__name__)


def balanced_weights(labels: np.ndarray, num_classes: int, *, multi_label: bool) -> np.ndarray:
    """CE class weights ``n / (k * count_c)`` (sklearn's "balanced"), or BCE ``pos_weight``
    ``negatives / positives`` per label; classes absent from the split get weight 1."""
    if multi_label:
        pos = labels.sum(axis=0).astype(np.float64)
        neg = len(labels) - pos
        return np.where(pos > 0, neg / np.maximum(pos, 1), 1.0).astype(np.float32)
    counts = np.bincount(labels[:, 0], minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 1.0)
    return weights.astype(np.float32)


def make_loss(cfg: TrainConfig, spec: ModelSpec, labels: np.ndarray) -> nn.Module:
    """BCE-with-logits for multi-label data, cross-entropy otherwise; weighted when
    ``class_weighting == "balanced"``; ``label_smoothing`` softens the targets (for BCE:
    each label's 0/1 becomes e/2 and 1 - e/2)."""
    weights = None
    if cfg.class_weighting == "balanced":
        weights = torch.from_numpy(
            balanced_weights(labels, spec.num_classes, multi_label=spec.multi_label)
        )
    if spec.multi_label:
        bce = nn.BCEWithLogitsLoss(pos_weight=weights)
        if not cfg.label_smoothing:
            return bce
        return _SmoothedBCE(bce, cfg.label_smoothing)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)


class _SmoothedBCE(nn.Module):
    def __init__(self, bce: nn.BCEWithLogitsLoss, smoothing: float) -> None:
        super().__init__()
        self.bce, self.smoothing = bce, smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.bce(logits, target * (1 - self.smoothing) + self.smoothing / 2)


def targets(spec: ModelSpec, y: torch.Tensor) -> torch.Tensor:
    return y.float() if spec.multi_label else y[:, 0].long()


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    raise ConfigError(f"optimizer: expected adam, adamw or sgd, got {cfg.optimizer!r}")


class Schedule:
    """One interface over the LR schedules: ``step(val_auc)`` once per epoch."""

    def __init__(self, cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> None:
        self.kind = cfg.scheduler
        sched = torch.optim.lr_scheduler
        self.impl: sched.LRScheduler | sched.ReduceLROnPlateau
        if self.kind == "cosine":
            self.impl = sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
        elif self.kind == "multistep":
            milestones = sorted({max(1, round(cfg.epochs * f)) for f in (0.5, 0.75)})
            self.impl = sched.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        elif self.kind == "plateau":
            self.impl = sched.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=1)
        elif self.kind == "none":
            self.impl = sched.LambdaLR(optimizer, lambda _: 1.0)
        else:
            raise ConfigError(f"scheduler: unknown {self.kind!r}")

    def step(self, val_auc: float) -> None:
        if isinstance(self.impl, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.impl.step(val_auc)
        else:
            self.impl.step()

    def state_dict(self) -> dict:
        return self.impl.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.impl.load_state_dict(state)


class WeightedDistributedSampler(Sampler[int]):
    """Draws ``len(weights)`` indices with replacement by weight each epoch (same draw on
    every rank, from ``seed + epoch``) and gives rank ``r`` every ``world``-th of them."""

    def __init__(self, weights: np.ndarray, rank: int, world: int, seed: int) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        self.total = len(weights) - len(weights) % world if len(weights) >= world else len(weights)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.total, replacement=True, generator=gen)
        return iter(drawn[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.total // self.world


def make_sampler(
    cfg: TrainConfig, labels: np.ndarray, dataset: Dataset, rank: int, world: int
) -> DistributedSampler | WeightedDistributedSampler:
    """Shuffling :class:`DistributedSampler`, or inverse-class-frequency weighted draws
    (``sampler == "balanced"``; multi-label: by the rarest positive finding of each image)."""
    if cfg.sampler == "shuffle":
        return DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed
        )
    if labels.shape[1] == 1:
        counts = np.bincount(labels[:, 0])
        weights = 1.0 / counts[labels[:, 0]]
    else:
        freq = labels.mean(axis=0)
        inv = np.where(labels == 1, 1.0 / np.maximum(freq, 1e-6), 0.0).max(axis=1)
        weights = np.where(inv > 0, inv, 1.0 / max(1e-6, float((labels.sum(1) == 0).mean())))
    return WeightedDistributedSampler(weights, rank, world, cfg.seed)


@dataclass
class EpochStats:
    loss_sum: float
    images: int
    seconds: float
    load_seconds: float  # time spent waiting for the input pipeline


def run_epoch(
    model: nn.Module,
    loader: DataLoader,
    *,
    transform: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    spec: ModelSpec,
    device: torch.device,
    autocast: Callable = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    on_step: Callable[[int, int, float, int], None] | None = None,
    mixer: BatchMixer | None = None,
) -> EpochStats:
    """One pass over ``loader``; returns summed loss and timings (this rank only). With a
    ``mixer``, each batch is mixed (MixUp/CutMix) after ``transform``."""
    model.train()
    started = time.perf_counter()
    total, count, load = 0.0, 0, 0.0
    steps = len(loader)
    waited = time.perf_counter()
    for step, (x, y) in enumerate(loader, start=1):
        load += time.perf_counter() - waited
        x = transform(x.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        y = targets(spec, y.to(device, non_blocking=True))
        x, y_other, lam = mixer(x, y) if mixer is not None else (x, y, 1.0)  # keeps the format
        with autocast():
            loss = mixed_loss(loss_fn, model(x), y, y_other, lam)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += loss.item() * len(x)
        count += len(x)
        if on_step is not None:
            on_step(step, steps, total / count, count)
        waited = time.perf_counter()
    return EpochStats(total, count, time.perf_counter() - started, load)
