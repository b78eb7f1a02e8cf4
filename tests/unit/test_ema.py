"""The weight average (``--ema-decay``): its arithmetic, and a checkpoint that resumes it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from training.config import TrainConfig
from training.ema import WeightAverage
from training.epoch import Schedule, make_optimizer
from training.errors import ConfigError
from training.model import save_weights
from training.ray_trainer import CHECKPOINT_FILE, STATE_FILE, _restore


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    loss = model(torch.randn(8, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_the_average_follows_the_formula_with_its_warm_up() -> None:
    model = _small()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = WeightAverage(model, 0.9)
    by_hand = {k: v.clone().float() for k, v in model.state_dict().items()}
    for step in range(1, 31):
        _train_step(model, optimizer)
        ema.update(model)
        d = min(0.9, (1 + step) / (10 + step))
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                by_hand[key] = d * by_hand[key] + (1 - d) * value.float()
            else:
                by_hand[key] = value.clone()
    assert [ema.decay_at(t) for t in (1, 8, 80)] == [2 / 11, 0.5, 0.9]
    averaged = ema.module.state_dict()
    for key, value in by_hand.items():
        torch.testing.assert_close(averaged[key].float(), value.float(), rtol=1e-5, atol=1e-6)
    # batch-norm statistics are averaged; the step counter is copied
    assert int(averaged["1.num_batches_tracked"]) == 30
    assert not torch.equal(averaged["1.running_mean"], model.state_dict()["1.running_mean"])
    # the average is its own module: training the model further does not move it
    before = ema.module[0].weight.clone()
    _train_step(model, optimizer)
    assert torch.equal(ema.module[0].weight, before)


def test_bad_decay_is_refused() -> None:
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(_small(), 0.0)


def test_a_checkpoint_resumes_both_the_model_and_its_average() -> None:
    """model.pt holds the average (what is validated and exported); the trained weights
    and the step count are in the training state, and both come back on resume."""
    import ray.train

    cfg = TrainConfig(epochs=2, ema_decay=0.9)
    model = _small()
    optimizer = make_optimizer(cfg, model.parameters())
    schedule = Schedule(cfg, optimizer)
    ema = WeightAverage(model, cfg.ema_decay)
    for _ in range(5):
        _train_step(model, optimizer)
        ema.update(model)
    with tempfile.TemporaryDirectory() as tmp:
        save_weights(ema.module, Path(tmp) / CHECKPOINT_FILE, "{}")
        state = {
            "ema": ema.state_dict(),
            "model": model.state_dict(),
            "epoch": 1,
            "metrics": {"val_auc": 0.5},
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
        }
        torch.save(state, Path(tmp) / STATE_FILE)
        fresh = _small()
        fresh[0].weight.data.zero_()
        fresh_optimizer = make_optimizer(cfg, fresh.parameters())
        epoch, metrics, average = _restore(
            ray.train.Checkpoint.from_directory(tmp),
            fresh,
            fresh_optimizer,
            Schedule(cfg, fresh_optimizer),
            None,
        )
    assert (epoch, metrics) == (1, {"val_auc": 0.5})
    torch.testing.assert_close(fresh.state_dict(), model.state_dict())
    resumed = WeightAverage(fresh, cfg.ema_decay)
    resumed.load(*average)
    assert resumed.steps == 5
    torch.testing.assert_close(resumed.module.state_dict(), ema.module.state_dict())
    assert not torch.equal(resumed.module[0].weight, fresh[0].weight)
