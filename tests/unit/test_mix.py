"""MixUp and CutMix (``--mixup-alpha`` / ``--cutmix-alpha``): what a mixed batch holds, the
mixed loss, seeding, refusal of bad values, and an epoch that trains with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.config import TrainConfig
from training.epoch import make_loss, run_epoch
from training.errors import ConfigError
from training.mix import BatchMixer, mixed_loss
from training.spec import ModelSpec


def _numbered(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i, and its target is i: a mixed pixel tells its sources."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, size, size).clone()
    return x, torch.arange(n)


def test_mixup_blends_each_image_with_its_partner_by_lam() -> None:
    mixer = BatchMixer(0.4, 0.0, seed=3)
    lams = []
    for _ in range(20):
        x, y = _numbered()
        mixed, partner, lam = mixer(x, y)
        expected = lam * y.float() + (1 - lam) * partner.float()
        torch.testing.assert_close(mixed[:, 0, 0, 0], expected)
        assert torch.equal(mixed.amin(dim=(1, 2, 3)), mixed.amax(dim=(1, 2, 3)))  # whole image
        lams.append(lam)
    assert all(0.0 <= lam <= 1.0 for lam in lams)
    assert len({round(lam, 6) for lam in lams}) > 10  # drawn per batch, not fixed


def test_cutmix_pastes_one_box_and_lam_is_the_kept_share() -> None:
    mixer = BatchMixer(0.0, 1.0, seed=5)
    pasted_any = False
    for _ in range(20):
        x, y = _numbered()
        mixed, partner, lam = mixer(x, y)
        for i in range(len(x)):
            values = set(mixed[i].unique().tolist())
            assert values <= {float(i), float(partner[i])}
            if partner[i] != i:
                taken = float((mixed[i] == partner[i]).float().mean())
                assert taken == pytest.approx(1 - lam)
                pasted_any |= taken > 0
                # the pasted pixels form one rectangle
                rows, cols = (mixed[i, 0] == partner[i]).nonzero(as_tuple=True)
                if len(rows):
                    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
                    assert int(box) == len(rows)
    assert pasted_any


def test_both_methods_alternate_and_a_seed_repeats_the_draws() -> None:
    def draws(seed: int) -> list[tuple[bool, float]]:
        mixer = BatchMixer(0.2, 1.0, seed=seed)
        out = []
        for _ in range(30):
            x, y = _numbered()
            mixed, _, lam = mixer(x, y)
            whole = bool(torch.equal(mixed.amin(dim=(1, 2, 3)), mixed.amax(dim=(1, 2, 3))))
            out.append((whole, round(lam, 9)))
        return out

    first = draws(11)
    assert first == draws(11)
    assert first != draws(12)
    cutmix_batches = sum(not whole for whole, _ in first)
    assert 5 <= cutmix_batches <= 25  # about half of the batches are CutMix


def test_mixed_loss_is_the_loss_on_mixed_targets_for_bce() -> None:
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    bce = nn.BCEWithLogitsLoss()
    lam = 0.7
    torch.testing.assert_close(
        mixed_loss(bce, logits, a, b, lam), bce(logits, lam * a + (1 - lam) * b)
    )
    ce = nn.CrossEntropyLoss()
    y, y2 = torch.tensor([0, 1]), torch.tensor([1, 1])
    assert mixed_loss(ce, logits, y, y2, 1.0) == ce(logits, y)


def test_negative_alphas_are_refused_with_the_field_named() -> None:
    with pytest.raises(ConfigError, match="mixup_alpha"):
        TrainConfig(mixup_alpha=-0.1)
    with pytest.raises(ConfigError, match="cutmix_alpha"):
        TrainConfig(cutmix_alpha=-1.0)
    with pytest.raises(ValueError, match="mixup_alpha"):
        BatchMixer(-0.2, 0.0)


def _train(mixer: BatchMixer | None) -> tuple[float, float]:
    """30 epochs of a linear model on two separable classes: (lowest epoch loss, accuracy)."""
    torch.manual_seed(0)
    n = 64
    y = torch.tensor([[i % 2] for i in range(n)], dtype=torch.uint8)
    x = (y.view(n, 1, 1, 1).float() * 200 + 20).expand(n, 1, 8, 8).to(torch.uint8)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    spec = ModelSpec("toy", "binary-class", ("a", "b"), 8, 1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    loss_fn = make_loss(TrainConfig(), spec, np.asarray(y))
    losses = []
    for _ in range(30):
        stats = run_epoch(
            model,
            loader,
            transform=lambda t: t.float() / 255,
            loss_fn=loss_fn,
            optimizer=optimizer,
            spec=spec,
            device=torch.device("cpu"),
            mixer=mixer,
        )
        losses.append(stats.loss_sum / stats.images)
    with torch.no_grad():
        accuracy = float((model(x.float() / 255).argmax(1) == y[:, 0]).float().mean())
    return min(losses), accuracy


def test_an_epoch_with_mixup_trains_on_mixed_batches() -> None:
    """run_epoch passes every batch through the mixer. With lam ~ 0.5 (a huge alpha), the
    pairs of different classes have 50/50 targets, which no model fits below log(2): about
    half the pairs, so the loss stays near log(2)/2, where the unmixed run goes to ~0. The
    mixed model still separates the classes."""
    plain_loss, plain_accuracy = _train(None)
    mixed_loss_floor, mixed_accuracy = _train(BatchMixer(1e6, 0.0, seed=0))
    assert plain_loss < 0.1 and plain_accuracy == 1.0
    assert mixed_loss_floor > 0.25
    assert mixed_accuracy == 1.0
