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
NORMALIZATIONS = ("medmnist", "imagenet")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "multistep", "plateau", "none")
AUGMENTATIONS = ("hflip", "affine", "contrast")
RECIPES = ("medmnist", "chexnet")


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


def default_cache_dir() -> str:
    """Decoded-image cache: ``$MEDIMG_CACHE_DIR/datasets``, else ``~/.cache/medimg/datasets``
    (``$XDG_CACHE_HOME`` honoured)."""
    root = os.environ.get("MEDIMG_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "medimg"
    )
    return str(Path(root).expanduser() / "datasets")


def default_data_dir() -> str:
    """``MEDIMG_DATA_DIR`` if set, else medmnist's own default root (``~/.medmnist``)."""
    return os.environ.get("MEDIMG_DATA_DIR") or str(Path("~/.medmnist").expanduser())


@dataclass
class TrainConfig:
    """Everything one training run needs; every field can be set from the CLI or Tune."""

    # data
    dataset: str = "pneumoniamnist"  # a MedMNIST flag, "folder" or "chestxray14"
    size: int = 28  # MedMNIST file resolution (28, 64, 128, 224)
    image_size: int = 64  # network input; DenseNet-121 needs >= 32 px
    crop: str = (
        ""  # "": the data set's (MedMNIST's own; none for folder/chestxray14) | center | none
    )
    data_dir: str = ""
    cache_dir: str = ""  # decoded file-based data sets (folder, chestxray14) are cached here
    val_fraction: float = 0.1  # folder / chestxray14 without given splits
    test_fraction: float = 0.2
    max_train_samples: int = 0  # 0: the whole training split
    normalization: str = "medmnist"  # "medmnist": (x - .5) / .5; "imagenet": ImageNet mean/std
    # model
    model_name: str = ""  # registered / served name; default "<dataset>-densenet121"
    pretrained_weights: str = ""  # local .pth of torchvision densenet121 (ImageNet) or CheXNet
    positive_class: str = ""  # binary: the finding ("" : from the data set, see training.spec)
    calibration: str = "temperature"  # temperature (fitted on val after training) | none
    gate: str = ""  # YAML promotion gate (training.gate): champion only if the version passes
    cohorts: str = ""  # cohort CSV: the test split is audited per cohort (training.audit_run)
    # optimisation
    recipe: str = ""  # "", "medmnist" or "chexnet": named presets (see training/recipes.py)
    epochs: int = 3
    batch_size: int = 32
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # cosine | multistep (50%/75%) | plateau (val AUC, /10) | none
    augment: str = ""  # comma-separated: hflip, affine, contrast ("" for none)
    aug_strength: float = 0.5  # 0..1, scales affine and contrast ranges
    label_smoothing: float = 0.0  # 0..0.5: cross-entropy targets (1 - e) + e / classes
    ema_decay: float = 0.0  # 0: off; 0 < d < 1: validate/keep an EMA of the weights (training.ema)
    mixup_alpha: float = 0.0  # 0: off; > 0: MixUp with lam ~ Beta(a, a) (training.mix)
    cutmix_alpha: float = 0.0  # 0: off; > 0: CutMix (both set: one of the two per batch)
    class_weighting: str = "none"  # none | balanced (pos_weight for BCE, class weights for CE)
    sampler: str = "shuffle"  # shuffle | balanced (inverse-frequency weighted sampling)
    precision: str = "auto"  # auto (bf16 where native: CUDA, AVX512-BF16/AMX) | bf16 | fp16 | fp32
    memory_format: str = "auto"  # auto (channels_last on CPU) | channels_last | contiguous
    seed: int = 0
    # Ray
    workers: int = 1
    cpus_per_worker: float = 0.0  # 0: share the cluster's CPUs between the workers
    gpus_per_worker: float = 0.0  # > 0 trains on GPUs
    use_gpu: bool = False  # set from gpus_per_worker / CUDA by resolve_resources
    ray_address: str = ""  # "", "auto", "ray://host:10001" or "host:6379"
    storage_path: str = "ray_results"
    storage_endpoint: str = (
        ""  # S3-compatible endpoint for an s3:// storage_path (training.storage)
    )
    num_to_keep: int = 2  # checkpoints kept, best by val AUC
    max_failures: int = 0  # worker-group restarts from the last checkpoint
    # MLflow
    tracking_uri: str = ""
    experiment: str = "medimg"
    mlflow_run_id: str = ""  # set by the driver; rank 0 logs per-epoch metrics into it
    resume_from: str = ""  # a checkpoint directory to start from (set by --resume)

    def __post_init__(self) -> None:
        self.dataset = self.dataset.lower()
        # Absolute paths: Ray workers run in another working directory than the driver.
        self.data_dir = str(Path(self.data_dir or default_data_dir()).expanduser().resolve())
        self.tracking_uri = absolute_tracking_uri(self.tracking_uri or default_tracking_uri())
        if "://" not in self.storage_path:  # s3:// or gs:// stay as given
            self.storage_path = str(Path(self.storage_path).expanduser().resolve())
        self.cache_dir = str(Path(self.cache_dir or default_cache_dir()).expanduser().resolve())
        if self.pretrained_weights:
            self.pretrained_weights = str(Path(self.pretrained_weights).expanduser().resolve())
        if self.gate:
            self.gate = str(Path(self.gate).expanduser().resolve())
        if self.cohorts:
            self.cohorts = str(Path(self.cohorts).expanduser().resolve())
        self.validate()

    def validate(self) -> None:
        checks: list[tuple[bool, str, str, Any]] = [
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
            (
                self.max_failures >= -1,
                "max_failures",
                ">= -1 (-1: retry forever)",
                self.max_failures,
            ),
            (self.gpus_per_worker >= 0, "gpus_per_worker", ">= 0", self.gpus_per_worker),
            (0 < self.val_fraction < 1, "val_fraction", "between 0 and 1", self.val_fraction),
            (0 < self.test_fraction < 1, "test_fraction", "between 0 and 1", self.test_fraction),
            (
                self.val_fraction + self.test_fraction < 1,
                "val_fraction + test_fraction",
                "< 1",
                self.val_fraction + self.test_fraction,
            ),
            (0 <= self.aug_strength <= 1, "aug_strength", "between 0 and 1", self.aug_strength),
            (
                0 <= self.label_smoothing <= 0.5,
                "label_smoothing",
                "between 0 and 0.5",
                self.label_smoothing,
            ),
            (
                0 <= self.ema_decay < 1,
                "ema_decay",
                "0 (off) or between 0 and 1 (e.g. 0.99)",
                self.ema_decay,
            ),
            (self.mixup_alpha >= 0, "mixup_alpha", "0 (off) or > 0 (e.g. 0.2)", self.mixup_alpha),
            (
                self.cutmix_alpha >= 0,
                "cutmix_alpha",
                "0 (off) or > 0 (e.g. 1.0)",
                self.cutmix_alpha,
            ),
            (
                not self.storage_endpoint or self.storage_path.startswith("s3://"),
                "storage_endpoint",
                "only with an s3:// storage_path",
                self.storage_endpoint,
            ),
        ]
        choices = {
            "normalization": NORMALIZATIONS,
            "optimizer": OPTIMIZERS,
            "scheduler": SCHEDULERS,
            "class_weighting": ("none", "balanced"),
            "sampler": ("shuffle", "balanced"),
            "precision": ("auto", "bf16", "fp16", "fp32"),
            "memory_format": ("auto", "channels_last", "contiguous"),
            "recipe": ("", *RECIPES),
            "calibration": ("temperature", "none"),
            "crop": ("", "center", "none"),
        }
        for name, allowed in choices.items():
            got = getattr(self, name)
            checks.append((got in allowed, name, f"one of {list(allowed)}", got))
        unknown_aug = sorted(set(self.augmentations) - set(AUGMENTATIONS))
        checks.append(
            (not unknown_aug, "augment", f"names from {list(AUGMENTATIONS)}", self.augment)
        )
        for ok, name, expected, got in checks:
            if not ok:
                raise ConfigError(f"{name}: expected {expected}, got {got!r}")

    @property
    def augmentations(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.augment.split(",") if a.strip())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        if "amp" in values:  # precision's name before 2026-12 (runs logged then can resume)
            old = values["amp"]
            values = {k: v for k, v in values.items() if k != "amp"}
            values.setdefault("precision", "fp32" if old == "off" else old)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)
