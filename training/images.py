"""Read one image file (PNG, JPEG, or a NumPy ``.npy`` array) as a uint8 array.

python -c "from training.images import read_image; print(read_image('x.png').shape)"
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
ARRAY_SUFFIXES = {".npy"}


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if (
        np.issubdtype(array.dtype, np.floating)
        and array.size
        and array.min() >= 0.0
        and array.max() <= 1.0
    ):
        return np.round(array * 255.0).astype(np.uint8)
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Return (H, W) or (H, W, C) uint8; raise :class:`DataError` naming the file otherwise.

    16-bit PNGs and non-uint8 arrays are rescaled to 0..255 (floats in [0, 1] by x255).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: not a NumPy .npy array ({exc})") from exc
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
            array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise DataError(
                f"{path}: expected an (H, W) or (H, W, C) image array, got shape {array.shape}"
            )
        if not np.issubdtype(array.dtype, np.number):
            raise DataError(f"{path}: expected a numeric array, got dtype {array.dtype}")
        return _scale_to_uint8(array)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                return _scale_to_uint8(np.asarray(img, dtype=np.int32))
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            return np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(
            f"{path}: not a readable image (PNG, JPEG or .npy expected): {exc}"
        ) from exc
