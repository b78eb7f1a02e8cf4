"""Hyperparameters and run settings in one dataclass.

``asdict(TrainConfig(...))`` is Ray Train's ``train_loop_config``, so Ray Tune can
override any field::

    python -c "from training.config import TrainConfig; print(TrainConfig(epochs=1))"
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from training.errors import ConfigError

DEFAULT_MLRUNS_DIR = "mlruns"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an embedded SQLite store under ``./mlruns/``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(DEFAULT_MLRUNS_DIR).resolve() / 'mlflow.db'}"


def absolute_tracking_uri(uri: str) -> str:
    """A relative SQLite URI (``sqlite:///x.db``) made absolute, so that Ray workers, whose
    working directory differs from the driver's, open the same file; other URIs as given."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return f"{prefix}{Path(uri[len(prefix) :]).resolve()}"
    return uri


def default_data_dir() -> str:
    """``MEDIMG_DATA_DIR`` if set, else medmnist's own default root (``~/.medmnist``)."""
    return os.environ.get("MEDIMG_DATA_DIR") or str(Path("~/.medmnist").expanduser())


@dataclass
class TrainConfig:
    """Everything one training run needs; every field can be set from the CLI or Tune."""

    dataset: str = "pneumoniamnist"
    size: int = 28  # MedMNIST file resolution (28, 64, 128, 224)
    image_size: int = 64  # network input; DenseNet-121 needs >= 29 px
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    workers: int = 1
    cpus_per_worker: float = 0.0  # 0: share this machine's cores between the workers
    use_gpu: bool = False
    max_train_samples: int = 0  # 0: the whole training split
    seed: int = 0
    data_dir: str = ""
    tracking_uri: str = ""
    experiment: str = "medimg"
    storage_path: str = "ray_results"
    num_to_keep: int = 2
    mlflow_run_id: str = ""  # set by the driver; rank 0 logs per-epoch metrics into it

    def __post_init__(self) -> None:
        self.dataset = self.dataset.lower()
        # Absolute paths: Ray workers run in another working directory than the driver.
        self.data_dir = str(Path(self.data_dir or default_data_dir()).expanduser().resolve())
        self.tracking_uri = absolute_tracking_uri(self.tracking_uri or default_tracking_uri())
        self.storage_path = str(Path(self.storage_path).expanduser().resolve())
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.size in (28, 64, 128, 224), "size", "one of 28, 64, 128, 224", self.size),
            (
                self.image_size >= 32,
                "image_size",
                ">= 32 (DenseNet-121 pools 5 times)",
                self.image_size,
            ),
            (self.epochs >= 1, "epochs", ">= 1", self.epochs),
            (self.batch_size >= 2, "batch_size", ">= 2 (batch norm)", self.batch_size),
            (self.lr > 0, "lr", "> 0", self.lr),
            (self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay),
            (self.workers >= 1, "workers", ">= 1", self.workers),
            (self.cpus_per_worker >= 0, "cpus_per_worker", ">= 0", self.cpus_per_worker),
            (self.max_train_samples >= 0, "max_train_samples", ">= 0", self.max_train_samples),
            (self.num_to_keep >= 1, "num_to_keep", ">= 1", self.num_to_keep),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise ConfigError(f"{name}: expected {expected}, got {got!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)
