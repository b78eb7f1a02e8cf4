"""Data sets, opened as uint8 images resized for the network plus int64 labels.

- every 2D MedMNIST v2 flag (:func:`known_datasets`) at size 28, 64, 128 or 224: the file
  ``<data_dir>/<flag>.npz`` (28 px) or ``<flag>_<size>.npz``, downloaded by ``medmnist``
  when absent and online; task, channels and class names from ``medmnist.INFO``;
- ``folder``: a class-per-subfolder tree of PNG/JPEG/DICOM files (:mod:`training.folder`);
- ``chestxray14``: NIH ChestX-ray14 as distributed (:mod:`training.chestxray14`).

:func:`open_split` is the one way to load a split: an :class:`ImageSplit` of uint8
(N, C, S, S) images through the training resize (:func:`~training.transforms.resize_to_uint8`)
and labels (N, L); ``.model_input(mean, std)`` normalises them for the network
(:func:`medmnist_arrays` is its MedMNIST source: the arrays as the file stores them). File-based
data sets are decoded once (a few threads) and cached under ``cache_dir`` -- never in
``data_dir``, which may be read-only -- memory-mapped so Ray workers share one copy. An
undecodable file is SKIPPED, with one warning per split naming the first few, and counted
in ``ImageSplit.skipped``: one corrupt file in 100,000 should not stop training::

    python -c "from training.data import DataOptions, open_split; \
s = open_split(DataOptions('pneumoniamnist', '../shared/data'), 'val', image_size=64); \
print(s.images.shape, s.labels.shape, s.model_input((0.5,), (0.5,)).dtype)"
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from training import chestxray14, folder
from training.config import default_cache_dir
from training.errors import ConfigError, DataError
from training.images import read_images
from training.transforms import normalize, resize_to_uint8

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
FILE_DATASETS = ("folder", "chestxray14")
SUPPORTED_TASKS = ("binary-class", "multi-class", "ordinal-regression", "multi-label, binary-class")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model trained on a data set needs to know about it."""

    name: str
    task: str  # "binary-class", "multi-class", "ordinal-regression", "multi-label, binary-class"
    class_names: tuple[str, ...]
    channels: int


@dataclass(frozen=True)
class DataOptions:
    """Where a data set is and how file-based ones are split and cached."""

    dataset: str
    data_dir: str
    size: int = 28  # MedMNIST file resolution
    cache_dir: str = ""  # "": training.config.default_cache_dir()
    val_fraction: float = 0.1  # folder / chestxray14 without given splits
    test_fraction: float = 0.2
    seed: int = 0  # max_samples subsampling
    crop: str = "none"  # file-based data sets: "center" crops each image to its short edge

    @classmethod
    def from_config(cls, cfg) -> DataOptions:  # cfg: training.config.TrainConfig
        return cls(
            dataset=cfg.dataset,
            data_dir=cfg.data_dir,
            size=cfg.size,
            cache_dir=cfg.cache_dir,
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
            crop=cfg.crop if cfg.dataset in FILE_DATASETS and cfg.crop else "none",
        )


def _medmnist_flags() -> list[str]:
    import medmnist

    return sorted(flag for flag in medmnist.INFO if not flag.endswith("3d"))


def known_datasets() -> list[str]:
    """The 2D MedMNIST flags of the installed ``medmnist``, then "folder" and "chestxray14"."""
    return [*_medmnist_flags(), *FILE_DATASETS]


def _medmnist_info(name: str) -> dict:
    """``medmnist.INFO[name]``; an unknown name lists the known ones."""
    import medmnist

    if name not in _medmnist_flags():
        raise ConfigError(f"dataset: unknown name {name!r}; known: {', '.join(known_datasets())}")
    info = medmnist.INFO[name]
    if info["task"] not in SUPPORTED_TASKS:
        raise ConfigError(f"dataset {name}: task {info['task']!r} is not supported yet")
    return info


def dataset_info(name: str, data_dir: str | Path = "") -> DatasetInfo:
    """Task, class names and channels; "folder" reads them from ``data_dir``."""
    name = name.lower()
    if name == "folder":
        classes, task, channels = folder.describe(data_dir)
        return DatasetInfo(name, task, classes, channels)
    if name == "chestxray14":
        return DatasetInfo(name, chestxray14.TASK, chestxray14.FINDINGS, 1)
    info = _medmnist_info(name)
    labels = info["label"]
    return DatasetInfo(
        name=name,
        task=info["task"],
        class_names=tuple(labels[k] for k in sorted(labels, key=int)),
        channels=int(info["n_channels"]),
    )


def npz_path(name: str, data_dir: str | Path, size: int = 28) -> Path:
    """The exact file ``medmnist`` reads: ``<dir>/<flag>.npz`` at 28 px, ``<flag>_<size>.npz`` else."""
    suffix = "" if size == 28 else f"_{size}"
    return Path(data_dir).expanduser() / f"{name.lower()}{suffix}.npz"


def _ensure_npz(name: str, data_dir: Path, size: int, download: bool) -> Path:
    """The npz file, downloaded through ``medmnist`` when absent (and allowed)."""
    import medmnist

    if size not in SIZES:
        raise ConfigError(f"size: expected one of {SIZES}, got {size!r}")
    info, path = _medmnist_info(name), npz_path(name, data_dir, size)
    if path.exists():
        return path
    if not download:
        raise DataError(f"{name}: file {path} not found in {data_dir} (download disabled)")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", path.name, data_dir)
        getattr(medmnist, info["python_class"])(
            split="train", root=str(data_dir), size=size, download=True
        )
    except Exception as exc:  # medmnist/torchvision raise URLError, RuntimeError, ...
        raise DataError(
            f"{name}: file {path} not found in {data_dir}, and downloading it failed "
            f"({type(exc).__name__}: {' '.join(str(exc).split())}). "
            f"Put {path.name} there or pass --data-dir."
        ) from exc
    return path


def _npz_header(archive: zipfile.ZipFile, key: str, path: Path) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of one array in an npz without reading its data."""
    try:
        with archive.open(f"{key}.npy") as handle:
            fmt = np.lib.format
            v1 = fmt.read_magic(handle) == (1, 0)
            shape, _, dtype = (fmt.read_array_header_1_0 if v1 else fmt.read_array_header_2_0)(
                handle
            )
    except KeyError:
        found = sorted(n.removesuffix(".npy") for n in archive.namelist())
        raise DataError(f"{path}: no array {key!r}; found {found}") from None
    return shape, dtype


def _check_npz(name: str, split: str, path: Path, size: int) -> np.ndarray:
    """Validate one split's arrays (image header, labels); return the labels (N, L) int64."""
    info = dataset_info(name)
    try:
        with zipfile.ZipFile(path) as archive:
            shape, dtype = _npz_header(archive, f"{split}_images", path)
            _npz_header(archive, f"{split}_labels", path)
        with np.load(path) as npz:
            labels = npz[f"{split}_labels"]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable MedMNIST .npz file ({exc})") from exc
    want = (size, size) if info.channels == 1 else (size, size, info.channels)
    if dtype != np.uint8 or tuple(shape[1:]) != want:
        raise DataError(
            f"{path}: {split}_images must be uint8 (N, {', '.join(map(str, want))}) for {name} "
            f"at size {size}; got {dtype} {tuple(shape)}"
        )
    multi = info.task.startswith("multi-label")
    width, high = (len(info.class_names), 1) if multi else (1, len(info.class_names) - 1)
    labels = labels.reshape(len(labels), -1) if labels.ndim else labels.reshape(0, 1)
    if len(labels) != shape[0] or labels.shape[1] != width:
        raise DataError(
            f"{path}: {split}_labels must be ({shape[0]}, {width}) for {name} ({info.task}); "
            f"got {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > high):
        raise DataError(
            f"{path}: {split}_labels must lie in 0..{high} for {name} ({info.task}), got "
            f"values {labels.min()}..{labels.max()}"
        )
    return labels.astype(np.int64)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split: expected one of {SPLITS}, got {split!r}")


def medmnist_arrays(
    name: str, split: str, data_dir: str | Path, size: int = 28, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One MedMNIST split as its file stores it, validated: uint8 images (N, H, W[, C]) and
    int64 labels (N, L). :func:`open_split` resizes these; clients send them as they are."""
    _check_split(split)
    name = name.lower()
    path = _ensure_npz(name, Path(data_dir).expanduser(), size, download)
    labels = _check_npz(name, split, path, size)
    with np.load(path) as npz:
        return npz[f"{split}_images"], labels


def _file_split(opts: DataOptions, split: str) -> folder.FileSplit:
    """The paths and labels of one split of a file-based data set; an empty split is an error."""
    module = folder if opts.dataset.lower() == "folder" else chestxray14
    files = module.split_files(opts.data_dir, split, opts.val_fraction, opts.test_fraction)
    if not files.paths:
        raise DataError(
            f"{opts.dataset.lower()} in {opts.data_dir}: the {split} split has no image"
        )
    return files


def check_data(opts: DataOptions) -> None:
    """Cheap validation of all three splits -- files, arrays, labels, class folders, label
    file columns, non-empty splits -- without decoding images. Downloads a missing MedMNIST
    file when online. Raises :class:`DataError`/:class:`ConfigError` naming what is wrong."""
    name = opts.dataset.lower()
    if name not in FILE_DATASETS:
        path = _ensure_npz(name, Path(opts.data_dir).expanduser(), opts.size, True)
        for split in SPLITS:
            _check_npz(name, split, path, opts.size)
        return
    dataset_info(name, opts.data_dir)
    for split in SPLITS:
        _file_split(opts, split)


def _subsample(labels: np.ndarray, max_samples: int, seed: int) -> np.ndarray | None:
    """Indices of a subsample stratified by the first label column (None: keep all)."""
    if not max_samples or max_samples >= len(labels):
        return None
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in np.unique(labels[:, 0]):
        idx = np.flatnonzero(labels[:, 0] == c)
        share = max(1, round(max_samples * len(idx) / len(labels)))
        keep.extend(rng.choice(idx, size=min(share, len(idx)), replace=False))
    return np.sort(np.asarray(keep[:max_samples]))


class ImageSplit(Dataset):
    """One split: uint8 (N, C, S, S) images and int64 (N, L) labels; items are tensors."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        paths: list[str] | None = None,
        skipped: int = 0,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise DataError(
                f"split: images must be uint8 (N, C, S, S) matching labels (N, L); got "
                f"{images.dtype} {images.shape} and labels {labels.shape}"
            )
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64).reshape(len(labels), -1)
        self.paths = paths
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.images[i])), torch.from_numpy(self.labels[i])

    def model_input(self, mean, std) -> np.ndarray:
        """All images normalised, float32 (N, C, S, S): what ``to_model_input`` gives."""
        return normalize(self.images, mean, std)


def open_split(
    opts: DataOptions,
    split: str,
    *,
    image_size: int,
    channels: int = 0,
    max_samples: int = 0,
) -> ImageSplit:
    """One split resized to ``image_size`` with ``channels`` (0: the data set's own);
    ``max_samples`` > 0 keeps a subsample stratified by the first label column (seed
    ``opts.seed``), drawn before decoding for file-based data sets. The network's input is
    ``open_split(...).model_input(mean, std)``."""
    _check_split(split)
    name = opts.dataset.lower()
    channels = channels or dataset_info(name, opts.data_dir).channels
    if name not in FILE_DATASETS:
        images, labels = medmnist_arrays(name, split, opts.data_dir, opts.size)
        keep = _subsample(labels, max_samples, opts.seed)
        if keep is not None:
            images, labels = images[keep], labels[keep]
        return ImageSplit(resize_to_uint8(images, image_size, channels), labels)
    files = _file_split(opts, split)
    keep = _subsample(files.labels, max_samples, opts.seed)
    paths, labels = files.paths, files.labels
    if keep is not None:
        paths, labels = [paths[i] for i in keep], labels[keep]
    cache_dir = opts.cache_dir or default_cache_dir()
    decoded = read_images(
        paths, image_size, channels, cache_dir=cache_dir, desc=f"{name} {split}", crop=opts.crop
    )
    if decoded.failed:
        shown = "; ".join(decoded.reasons[:3]) + (" ..." if len(decoded.failed) > 3 else "")
        what = f"{name} {split}: skipped {len(decoded.failed)} of {len(paths)} image(s)"
        log.warning("%s that could not be decoded: %s", what, shown)
        ok = np.setdiff1d(np.arange(len(paths)), decoded.failed)
        paths, labels = [paths[i] for i in ok], labels[ok]
    if not len(paths):
        raise DataError(f"{name} {split}: none of the {len(decoded.failed)} image(s) decoded")
    return ImageSplit(decoded.images, labels, paths, skipped=len(decoded.failed))
