"""MedMNIST data through the ``medmnist`` package, preprocessed once into tensors.

Files are looked up in ``--data-dir`` / ``MEDIMG_DATA_DIR`` (default ``~/.medmnist``)
and downloaded there when absent and online::

    python -c "from training.data import load_split; x, y = load_split('pneumoniamnist', 'val', '../shared/data'); print(x.shape, y.shape)"
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.errors import ConfigError, DataError
from training.transforms import to_model_input

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SUPPORTED_TASKS = ("binary-class", "multi-class", "ordinal-regression", "multi-label, binary-class")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model trained on a data set needs to know about it."""

    name: str
    task: str  # "binary-class", "multi-class", "ordinal-regression", "multi-label, binary-class"
    class_names: tuple[str, ...]
    channels: int


def known_datasets() -> list[str]:
    """The 2D MedMNIST flags this version of ``medmnist`` knows."""
    import medmnist

    return sorted(flag for flag in medmnist.INFO if not flag.endswith("3d"))


def dataset_info(name: str, data_dir: str | Path = "") -> DatasetInfo:
    """Task, class names and channels of a data set; an unknown name lists the known ones."""
    info = _medmnist_info(name)
    labels = info["label"]
    return DatasetInfo(
        name=name.lower(),
        task=info["task"],
        class_names=tuple(labels[k] for k in sorted(labels, key=int)),
        channels=int(info["n_channels"]),
    )


def _medmnist_info(name: str) -> dict:
    """``medmnist.INFO[name]``; an unknown name lists the known ones."""
    import medmnist

    name = name.lower()
    if name not in known_datasets():
        raise ConfigError(f"dataset: unknown name {name!r}; known: {', '.join(known_datasets())}")
    info = medmnist.INFO[name]
    if info["task"] not in SUPPORTED_TASKS:
        raise ConfigError(f"dataset {name}: task {info['task']!r} is not supported yet")
    return info


def npz_path(name: str, data_dir: str | Path, size: int = 28) -> Path:
    """The exact file ``medmnist`` reads: ``<dir>/<flag>.npz`` at 28 px, ``<flag>_<size>.npz`` else."""
    suffix = "" if size == 28 else f"_{size}"
    return Path(data_dir).expanduser() / f"{name.lower()}{suffix}.npz"


def _medmnist_split(name: str, split: str, data_dir: Path, size: int, download: bool):
    import medmnist

    info = _medmnist_info(name)
    cls = getattr(medmnist, info["python_class"])
    path = npz_path(name, data_dir, size)
    if not path.exists():
        if not download:
            raise DataError(f"{name}: file {path} not found in {data_dir} (download disabled)")
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            log.info("downloading %s to %s", path.name, data_dir)
            cls(split=split, root=str(data_dir), size=size, download=True)
        except Exception as exc:  # medmnist/torchvision raise URLError, RuntimeError, ...
            raise DataError(
                f"{name}: file {path} not found in {data_dir}, and downloading it failed "
                f"({type(exc).__name__}: {' '.join(str(exc).split())}). "
                f"Put {path.name} there or pass --data-dir."
            ) from exc
    try:
        return cls(split=split, root=str(data_dir), size=size, download=False)
    except Exception as exc:
        raise DataError(f"{name}: cannot read {path}: {type(exc).__name__}: {exc}") from exc


def load_split(
    name: str, split: str, data_dir: str | Path, size: int = 28, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 images (N, H, W[, C]) and integer labels (N, L) of one split."""
    if split not in SPLITS:
        raise ConfigError(f"split: expected one of {SPLITS}, got {split!r}")
    ds = _medmnist_split(name, split, Path(data_dir).expanduser(), size, download)
    images, labels = np.asarray(ds.imgs), np.asarray(ds.labels)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
        raise DataError(
            f"{npz_path(name, data_dir, size)}: {split}_images must be uint8 (N, H, W[, C]) matching "
            f"{split}_labels; got {images.dtype} {images.shape} and labels {labels.shape}"
        )
    labels = labels.reshape(len(labels), -1).astype(np.int64)
    info = dataset_info(name)
    high = 1 if info.task.startswith("multi-label") else len(info.class_names) - 1
    if labels.size and (labels.min() < 0 or labels.max() > high):
        raise DataError(
            f"{npz_path(name, data_dir, size)}: {split}_labels must lie in 0..{high} for {name} "
            f"({info.task}), got values {labels.min()}..{labels.max()}"
        )
    return images, labels


@dataclass
class Split:
    """One split, preprocessed for the network: float32 (N, C, S, S) and labels (N, L)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def prepare_split(
    name: str,
    split: str,
    data_dir: str | Path,
    *,
    size: int = 28,
    image_size: int = 64,
    max_samples: int = 0,
    seed: int = 0,
) -> Split:
    """Load a split and run it through the shared preprocessing; optionally subsample.

    Subsampling is stratified by the first label column so tiny runs still see
    every class.
    """
    images, labels = load_split(name, split, data_dir, size)
    if max_samples and max_samples < len(images):
        rng = np.random.default_rng(seed)
        keep: list[int] = []
        classes = np.unique(labels[:, 0])
        for c in classes:
            idx = np.flatnonzero(labels[:, 0] == c)
            share = max(1, round(max_samples * len(idx) / len(images)))
            keep.extend(rng.choice(idx, size=min(share, len(idx)), replace=False))
        keep_arr = np.sort(np.asarray(keep[:max_samples]))
        images, labels = images[keep_arr], labels[keep_arr]
    channels = dataset_info(name).channels
    return Split(x=to_model_input(images, image_size, channels), y=labels)
