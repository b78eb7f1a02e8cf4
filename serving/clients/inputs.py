"""What the client commands send: image files found under paths, or the images of a
MedMNIST ``.npz`` split, as :class:`Item` objects that turn into request payloads.

Directories are walked recursively for PNG, JPEG, DICOM and ``.npy`` files (and
extension-less files that carry the DICOM magic, as PACS exports often are); a
``.npz`` argument stands for the images of one of its splits::

    python -c "from serving.clients.inputs import collect_items; \
print([i.name for i in collect_items(['../shared/data/samples'])[0]])"
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.errors import DataError
from training.images import read_dicom_ids, read_image
from training.spec import ModelSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".npy"}


@dataclass(frozen=True)
class Item:
    """One image to classify: a file, or an in-memory uint8 image (an ``.npz`` row)."""

    name: str
    path: Path | None = None
    image: np.ndarray | None = None  # uint8 (H, W) or (H, W, C), as MedMNIST stores it

    def payload(self, spec: ModelSpec, *, tensor: bool) -> bytes | np.ndarray:
        """Encoded bytes for the ensemble, or the preprocessed (1, C, S, S) float32 tensor."""
        if self.path is not None:
            if tensor:
                return spec.preprocess(read_image(self.path)[None])
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise DataError(f"{self.path}: cannot read ({exc.strerror})") from exc
            if not data:
                raise DataError(f"{self.path}: empty file (0 bytes)")
            return data
        if self.image is None:
            raise DataError(f"{self.name}: no file and no image")
        return spec.preprocess(self.image[None]) if tensor else npy_bytes(self.image)

    def dicom_ids(self) -> dict[str, str]:
        """Patient/study identifiers of a DICOM file ({} for anything else)."""
        if self.path is None or not is_dicom_file(self.path):
            return {}
        return read_dicom_ids(self.path)


def npy_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(image), allow_pickle=False)
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W) or (H, W, C) image as PNG (lossless)."""
    from PIL import Image

    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _image_files(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(p.startswith(".") for p in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES or (not path.suffix and is_dicom_file(path)):
            found.append(path)
    return found


def npz_items(path: Path, split: str = "") -> list[Item]:
    """The images of one split of a MedMNIST ``.npz`` (``split`` "" = the only or the test
    split), named ``FILE:SPLIT[i]``."""
    try:
        with zipfile.ZipFile(path) as archive:
            keys = sorted(
                n.removesuffix("_images.npy")
                for n in archive.namelist()
                if n.endswith("_images.npy")
            )
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    if not keys:
        raise DataError(f"{path}: no '<split>_images' array (MedMNIST .npz expected)")
    chosen = split or (keys[0] if len(keys) == 1 else "test")
    if chosen not in keys:
        raise DataError(f"{path}: no split {chosen!r}; it holds {keys} (pass --split)")
    with np.load(path) as npz:
        images = npz[f"{chosen}_images"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(
            f"{path}: {chosen}_images must be uint8 (N, H, W[, C]); got {images.dtype} "
            f"{images.shape}"
        )
    return [Item(name=f"{path}:{chosen}[{i}]", image=img) for i, img in enumerate(images)]


def collect_items(paths: Sequence[str | Path], split: str = "") -> tuple[list[Item], list[str]]:
    """(items, errors): files as given, directories walked, ``.npz`` splits expanded; a
    path that does not exist, or a directory without images, is an error naming it."""
    items: list[Item] = []
    errors: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = _image_files(path)
            if not found:
                suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                errors.append(f"{path}: no image files ({suffixes} or DICOM) in this directory")
            items.extend(Item(name=str(p), path=p) for p in found)
        elif path.suffix.lower() == ".npz" and path.is_file():
            try:
                items.extend(npz_items(path, split))
            except DataError as exc:
                errors.append(str(exc))
        else:  # a missing file is reported per file, when its turn comes
            items.append(Item(name=str(path), path=path))
    return items, errors


def file_items(files: Iterable[str | Path]) -> list[Item]:
    return [Item(name=str(f), path=Path(f)) for f in files]
