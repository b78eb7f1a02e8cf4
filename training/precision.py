"""Numeric precision and memory format of training, decided once per worker.

``precision="auto"`` trains in bf16 autocast where the hardware computes bf16 natively
(CUDA with bf16, or a CPU with AVX512-BF16 / AMX-BF16; oneDNN emulates it elsewhere and
is slower than fp32), fp16 with a grad scaler on CUDA without bf16, and fp32 otherwise.
``memory_format="auto"`` keeps activations channels-last on CPU, where oneDNN's
convolutions are faster that way (``benchmarks/cpu_speed.py`` measures both). Weights
stay fp32 in every case, so checkpoints, export and serving are unchanged::

    python -c "import torch; from training.config import TrainConfig; \
from training.precision import resolve; print(resolve(TrainConfig(), torch.device('cpu')))"
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from training.config import TrainConfig
from training.errors import ConfigError

_NATIVE_BF16 = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16)."""
    with contextlib.suppress(AttributeError, RuntimeError):  # a private API: may go away
        caps = torch._C._cpu._get_cpu_capability()  # torch's own cpuinfo probe
        return any(bool(caps.get(flag)) for flag in _NATIVE_BF16)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in _NATIVE_BF16)


@dataclass(frozen=True)
class Precision:
    """What a worker trains with: the autocast dtype (None: fp32), the memory format of
    the model and its inputs, and whether fp16 needs a grad scaler."""

    device_type: str
    dtype: torch.dtype | None
    memory_format: torch.memory_format

    @property
    def name(self) -> str:
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]
        fmt = "+channels_last" if self.memory_format == torch.channels_last else ""
        return dtype + fmt

    def autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        """A factory of the forward pass's autocast context (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext
        device_type, dtype = self.device_type, self.dtype
        return lambda: torch.autocast(device_type, dtype=dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range."""
        return torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None


def _dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if precision == "fp16" else torch.bfloat16
    if precision == "fp16":
        raise ConfigError(
            f"precision: 'fp16' needs a CUDA device, this worker trains on {device.type} "
            "(use --precision auto, bf16 or fp32)"
        )
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else None
    return torch.bfloat16  # asked for: emulated where the CPU has no native bf16


def check_workers_can(cfg: TrainConfig) -> None:
    """Refuse what the workers' device cannot do, once resources are resolved (``use_gpu``)."""
    if cfg.precision == "fp16" and not cfg.use_gpu:
        raise ConfigError(
            "precision: 'fp16' needs CUDA workers and this run trains on CPUs "
            "(use --precision auto, bf16 or fp32, or --gpus-per-worker)"
        )


def resolve(cfg: TrainConfig, device: torch.device) -> Precision:
    """``cfg.precision`` and ``cfg.memory_format`` for ``device``."""
    fmt = cfg.memory_format
    channels_last = fmt == "channels_last" or (fmt == "auto" and device.type == "cpu")
    return Precision(
        device.type,
        _dtype(cfg.precision, device),
        torch.channels_last if channels_last else torch.contiguous_format,
    )
