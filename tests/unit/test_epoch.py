"""Training pieces: class weighting, balanced sampling, augmentation, recipes, pretrained
weights. Real tensors and real torchvision weights files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import densenet121

from training.augment import BatchTransform
from training.config import TrainConfig
from training.epoch import (
    Schedule,
    WeightedDistributedSampler,
    balanced_weights,
    make_loss,
    make_optimizer,
    make_sampler,
)
from training.errors import ConfigError
from training.model import build_model
from training.recipes import build_config
from training.spec import ModelSpec


def test_balanced_class_weights_match_sklearn() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([[0]] * 30 + [[1]] * 10 + [[2]] * 60)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels[:, 0])
    np.testing.assert_allclose(balanced_weights(labels, 3, multi_label=False), expected, rtol=1e-6)
    multi = np.array([[1, 0], [0, 0], [0, 1], [0, 1]])
    # pos_weight = negatives / positives per label
    np.testing.assert_allclose(balanced_weights(multi, 2, multi_label=True), [3.0, 1.0])


def test_weighted_loss_is_used(tmp_path: Path) -> None:
    spec = ModelSpec("x", "binary-class", ("a", "b"), 32, 1)
    labels = np.array([[0]] * 90 + [[1]] * 10)
    weighted = make_loss(
        TrainConfig(class_weighting="balanced", data_dir=str(tmp_path)), spec, labels
    )
    plain = make_loss(TrainConfig(data_dir=str(tmp_path)), spec, labels)
    # a correct majority case and a missed minority case: the miss weighs 9x more
    logits, target = torch.tensor([[2.0, -2.0], [2.0, -2.0]]), torch.tensor([0, 1])
    assert weighted(logits, target) > plain(logits, target) * 1.5


def test_balanced_sampler_evens_out_classes_across_ranks() -> None:
    labels = np.array([[0]] * 900 + [[1]] * 100)
    cfg = TrainConfig(sampler="balanced")
    ranks = [make_sampler(cfg, labels, list(range(1000)), r, 2) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(3)
    drawn = np.concatenate([list(s) for s in ranks])
    assert len(drawn) == 1000 and all(len(s) == 500 for s in ranks)
    share = labels[drawn, 0].mean()
    assert 0.4 < share < 0.6, share  # 0.1 without balancing
    again = WeightedDistributedSampler(np.ones(10), 0, 2, seed=0)
    again.set_epoch(1)
    first = list(again)
    again.set_epoch(2)
    assert first != list(again)  # a new draw every epoch


def test_augmentation_changes_train_batches_only() -> None:
    x = torch.randint(0, 256, (16, 1, 48, 48), dtype=torch.uint8)
    t = BatchTransform(
        ("hflip", "affine", "contrast"), 1.0, (0.5,), (0.5,), torch.Generator().manual_seed(0)
    )
    plain = (x.float() / 255 - 0.5) / 0.5
    assert torch.equal(t(x, train=False), plain)
    out = t(x, train=True)
    assert out.shape == plain.shape and out.min() >= -1 and out.max() <= 1
    changed = (out - plain).abs().flatten(1).max(1).values > 1e-3
    assert changed.float().mean() > 0.9  # per-image random parameters
    flip = BatchTransform(("hflip",), 0.0, (0.5,), (0.5,), torch.Generator().manual_seed(1))(
        x, train=True
    )
    same = [
        torch.equal(flip[i], plain[i]) or torch.equal(flip[i], plain[i].flip(-1)) for i in range(16)
    ]
    assert all(same)
    with pytest.raises(ConfigError, match="zoom"):
        BatchTransform(("zoom",), 0.5, (0.5,), (0.5,))


def test_recipes_set_defaults_and_explicit_options_win() -> None:
    chexnet = build_config("chexnet", epochs=1)
    assert (chexnet.image_size, chexnet.batch_size, chexnet.scheduler) == (224, 16, "plateau")
    assert (chexnet.normalization, chexnet.augment, chexnet.class_weighting) == (
        "imagenet",
        "hflip",
        "balanced",
    )
    assert build_config("chexnet", batch_size=4).batch_size == 4
    medmnist = build_config("medmnist")
    assert (medmnist.batch_size, medmnist.scheduler, medmnist.epochs) == (128, "multistep", 100)
    opt = make_optimizer(medmnist, [torch.nn.Parameter(torch.zeros(1))])
    sched = Schedule(medmnist, opt)
    assert sched.impl.milestones == {50: 1, 75: 1}
    with pytest.raises(ConfigError, match="recipe"):
        build_config("resnet")


def test_pretrained_weights_load_from_a_local_file(tmp_path: Path) -> None:
    reference = densenet121(weights=None)
    path = tmp_path / "densenet121-imagenet.pth"
    torch.save(reference.state_dict(), path)
    grey = build_model(1, 2, str(path))
    summed = reference.features.conv0.weight.sum(dim=1, keepdim=True)
    assert torch.allclose(grey.features.conv0.weight, summed)
    assert torch.equal(grey.features.norm5.running_var, reference.features.norm5.running_var)
    assert grey.classifier.out_features == 2
    # CheXNet-style checkpoint: wrapped, prefixed, old "norm.1" key names
    old = {
        "module.densenet121." + k.replace("norm1", "norm.1"): v
        for k, v in reference.state_dict().items()
    }
    chexnet = tmp_path / "chexnet.pth.tar"
    torch.save({"state_dict": old, "epoch": 3}, chexnet)
    rgb = build_model(3, 14, str(chexnet))
    assert torch.equal(
        rgb.features.denseblock3.denselayer5.norm1.weight,
        reference.features.denseblock3.denselayer5.norm1.weight,
    )
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(ConfigError, match="not a DenseNet-121"):
        build_model(1, 2, str(bad))
    with pytest.raises(ConfigError, match="no such file"):
        build_model(1, 2, str(tmp_path / "missing.pth"))


def test_label_smoothing_softens_the_targets(tmp_path: Path) -> None:
    spec = ModelSpec("x", "binary-class", ("a", "b"), 32, 1)
    labels = np.array([[0], [1]])
    sharp = torch.tensor([[20.0, -20.0], [-20.0, 20.0]])  # confident and right
    plain = make_loss(TrainConfig(data_dir=str(tmp_path)), spec, labels)
    smooth = make_loss(TrainConfig(data_dir=str(tmp_path), label_smoothing=0.2), spec, labels)
    target = torch.tensor([0, 1])
    assert plain(sharp, target) < 1e-6 < 1.0 < smooth(sharp, target)  # over-confidence costs
    multi = ModelSpec("m", "multi-label, binary-class", ("a", "b"), 32, 1)
    bce = make_loss(TrainConfig(data_dir=str(tmp_path), label_smoothing=0.2), multi, labels)
    # the smoothed BCE's optimum is at p = 1 - e/2 = 0.9 for a positive label
    best = torch.logit(torch.tensor([[0.9, 0.1]]))
    worse = torch.logit(torch.tensor([[0.99, 0.01]]))
    assert bce(best, torch.tensor([[1.0, 0.0]])) < bce(worse, torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ConfigError, match="label_smoothing"):
        TrainConfig(label_smoothing=0.7)
