"""Training precision and memory format: what ``auto`` resolves to on this machine's CPU,
the errors for what a device cannot do, and one real bf16 channels-last training epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from training.config import TrainConfig
from training.epoch import make_optimizer, run_epoch
from training.errors import ConfigError
from training.model import build_model
from training.precision import check_workers_can, cpu_supports_bf16, resolve
from training.spec import ModelSpec

CPU = torch.device("cpu")


def test_cpu_probe_agrees_with_the_kernel() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set(cpuinfo.read_text().split())
    assert cpu_supports_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_auto_on_cpu_is_native_bf16_and_channels_last() -> None:
    p = resolve(TrainConfig(), CPU)
    assert p.dtype == (torch.bfloat16 if cpu_supports_bf16() else None)
    assert p.memory_format == torch.channels_last and p.scaler() is None
    assert p.name == ("bf16" if cpu_supports_bf16() else "fp32") + "+channels_last"


def test_explicit_choices_and_what_cpu_cannot_do() -> None:
    fp32 = resolve(TrainConfig(precision="fp32", memory_format="contiguous"), CPU)
    assert fp32.dtype is None and fp32.memory_format == torch.contiguous_format
    assert fp32.name == "fp32"
    with fp32.autocast()():
        assert not torch.is_autocast_enabled("cpu")
    bf16 = resolve(TrainConfig(precision="bf16"), CPU)
    with bf16.autocast()():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="precision: 'fp16' needs a CUDA device"):
        resolve(TrainConfig(precision="fp16"), CPU)
    with pytest.raises(ConfigError, match="precision: expected one of"):
        TrainConfig(precision="int8")
    with pytest.raises(ConfigError, match="'fp16' needs CUDA workers"):
        check_workers_can(TrainConfig(precision="fp16"))
    check_workers_can(TrainConfig(precision="fp16", use_gpu=True, gpus_per_worker=1))


def test_runs_logged_with_the_old_amp_field_still_load() -> None:
    assert TrainConfig.from_dict({"amp": "off"}).precision == "fp32"
    assert TrainConfig.from_dict({"amp": "bf16"}).precision == "bf16"
    assert TrainConfig.from_dict({"amp": "off", "precision": "auto"}).precision == "auto"


def test_a_bf16_channels_last_epoch_trains_fp32_weights() -> None:
    torch.manual_seed(0)
    p = resolve(TrainConfig(precision="bf16", memory_format="channels_last"), CPU)
    model = build_model(1, 2).to(memory_format=p.memory_format)
    seen: list[torch.Tensor] = []
    model.features.conv0.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8)
    y = torch.from_numpy(np.array([[i % 2] for i in range(16)]))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    before = model.classifier.weight.detach().clone()
    stats = run_epoch(
        model,
        loader,
        transform=lambda b: b.float() / 255,
        loss_fn=torch.nn.CrossEntropyLoss(),
        optimizer=make_optimizer(TrainConfig(), model.parameters()),
        spec=ModelSpec("x", "binary-class", ("a", "b"), 32, 1),
        device=CPU,
        autocast=p.autocast(),
        memory_format=p.memory_format,
    )
    assert stats.images == 16 and np.isfinite(stats.loss_sum)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in seen)
    assert model.classifier.weight.dtype == torch.float32
    assert not torch.equal(model.classifier.weight, before)
