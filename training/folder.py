"""A class-per-subfolder image tree as a data set (``dataset="folder"``), MedNIST style::

    DIR/AbdomenCT/000001.jpeg   DIR/CXR/000001.jpeg   ...        (split here), or
    DIR/train/AbdomenCT/...     DIR/val/AbdomenCT/... DIR/test/AbdomenCT/...  (used as given)

Images are the PNG, JPEG and DICOM files (by suffix: .png .jpg .jpeg .dcm .dicom, any
depth below the class folder, hidden files ignored). Class names are the sorted class
folder names; 2 classes make a "binary-class" task, more a "multi-class" one.

Without ``train/ val/ test/`` the files are split stratified by class (scikit-learn's
``train_test_split``) with the fixed seed :data:`SPLIT_SEED`: first ``test_fraction`` of
all images, then ``val_fraction`` of all images out of the rest. The split depends only
on the sorted file list and the fractions -- not on the training seed -- so every run and
every export sees the same test set. With the three folders their class sets must match.

Channels: 1 when the first :data:`CHANNEL_PROBE` images (sorted) of every class are grey
(one channel, or RGB with R = G = B), else 3 -- a cheap scan, not of every image::

    python -c "from training.folder import describe; print(describe('path/to/MedNIST'))"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.errors import DataError
from training.images import read_image

SPLITS = ("train", "val", "test")
SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
SPLIT_SEED = 0
CHANNEL_PROBE = 3


@dataclass(frozen=True)
class FileSplit:
    """The files of one split and their labels (N, L) int64, before decoding."""

    paths: list[str]
    labels: np.ndarray


def _subdirs(path: Path) -> list[str]:
    return sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_under(path: Path) -> list[str]:
    return sorted(
        str(p)
        for p in path.rglob("*")
        if p.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.is_file()
    )


def _classes(root: Path) -> dict[str, list[str]]:
    """{class name: its image files} of one class-per-subfolder tree."""
    classes = {name: _images_under(root / name) for name in _subdirs(root)}
    if len(classes) < 2:
        raise DataError(
            f"{root}: expected one sub-folder per class (at least 2), got "
            f"{len(classes)}: {sorted(classes)}"
        )
    return classes


def _root(data_dir: str | Path) -> Path:
    root = Path(data_dir).expanduser()
    if not str(data_dir) or not root.is_dir():
        raise DataError(
            f"folder data set: data_dir {str(data_dir)!r} is not a directory; pass --data-dir "
            "DIR with one sub-folder per class (or train/ val/ test/ holding them)"
        )
    return root


def given_splits(data_dir: str | Path) -> dict[str, dict[str, list[str]]] | None:
    """{split: {class: files}} when ``data_dir`` has ``train/ val/ test/``, else None."""
    root = _root(data_dir)
    subdirs = _subdirs(root)
    if not set(subdirs) & set(SPLITS):
        return None
    if set(subdirs) != set(SPLITS):
        raise DataError(
            f"{root}: with split folders, exactly train/, val/ and test/ (each with one "
            f"folder per class) are expected; got sub-folders {subdirs}"
        )
    trees = {split: _classes(root / split) for split in SPLITS}
    names = set(trees["train"])
    for split in ("val", "test"):
        if set(trees[split]) != names:
            raise DataError(
                f"{root / split}: class folders must match {root / 'train'}; missing "
                f"{sorted(names - set(trees[split]))}, extra {sorted(set(trees[split]) - names)}"
            )
    return trees


def class_files(data_dir: str | Path) -> dict[str, list[str]]:
    """{class: every image file} over the whole tree (all given splits together)."""
    trees = given_splits(data_dir)
    if trees is None:
        return _classes(_root(data_dir))
    return {c: [f for s in SPLITS for f in trees[s][c]] for c in trees["train"]}


def _is_grey(image: np.ndarray) -> bool:
    if image.ndim == 2 or image.shape[2] == 1:
        return True
    return bool(
        np.array_equal(image[..., 0], image[..., 1])
        and np.array_equal(image[..., 0], image[..., 2])
    )


def describe(data_dir: str | Path) -> tuple[tuple[str, ...], str, int]:
    """(class names, task, channels) of the tree; see the module docstring for the rules."""
    files = class_files(data_dir)
    empty = sorted(c for c, f in files.items() if not f)
    if empty:
        raise DataError(
            f"{data_dir}: class folder(s) {empty} hold no image ({', '.join(sorted(SUFFIXES))})"
        )
    channels, read = 1, 0
    for paths in files.values():
        for path in paths[:CHANNEL_PROBE]:
            try:
                image = read_image(path)
            except DataError:
                continue  # reported (and skipped) when the split is decoded
            read += 1
            if not _is_grey(image):
                channels = 3
    if not read:
        raise DataError(f"{data_dir}: none of the first images of each class could be read")
    names = tuple(sorted(files))
    return names, "binary-class" if len(names) == 2 else "multi-class", channels


def _stratified(y: np.ndarray, fraction: float, what: str, root: Path) -> tuple:
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(
            np.arange(len(y)), test_size=fraction, stratify=y, random_state=SPLIT_SEED
        )
    except ValueError as exc:
        counts = dict(zip(*np.unique(y, return_counts=True), strict=True))
        raise DataError(
            f"{root}: cannot split {len(y)} images stratified by class ({what} fraction "
            f"{fraction:.3g}): {exc}; images per class index: {counts}. Add images or "
            "provide train/ val/ test/ folders."
        ) from exc


def split_files(
    data_dir: str | Path, split: str, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> FileSplit:
    """The files and (N, 1) class indices of one split."""
    if split not in SPLITS:
        raise DataError(f"split: expected one of {SPLITS}, got {split!r}")
    root = _root(data_dir)
    trees = given_splits(root)
    if trees is not None:
        names = sorted(trees["train"])
        pairs = [(f, i) for i, c in enumerate(names) for f in trees[split][c]]
        return FileSplit([f for f, _ in pairs], np.array([[i] for _, i in pairs], np.int64))
    files = class_files(root)
    paths = [f for c in sorted(files) for f in files[c]]
    y = np.array([i for i, c in enumerate(sorted(files)) for _ in files[c]], np.int64)
    rest, test = _stratified(y, test_fraction, "test", root)
    train, val = _stratified(y[rest], val_fraction / (1 - test_fraction), "val", root)
    chosen = {"train": rest[train], "val": rest[val], "test": test}[split]
    chosen = np.sort(chosen)
    return FileSplit([paths[i] for i in chosen], y[chosen][:, None])
