"""The one preprocessing path, shared by training, export parity checks and clients.

uint8 images of any size (N, H, W) or (N, H, W, C) become float32 (N, C, S, S):
resized with PIL's bilinear filter, scaled to [0, 1], then normalised with
``(x - MEAN) / STD``::

    python -c "import numpy as np; from training.transforms import to_model_input; \
print(to_model_input(np.zeros((2, 28, 28), np.uint8), 64, 1).shape)"
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.errors import DataError

MEAN = 0.5
STD = 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization_stats(name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std): ``medmnist`` is 0.5 / 0.5; ``imagenet`` is ImageNet's RGB
    statistics, or their average for one grey channel."""
    if name == "medmnist":
        return (MEAN,) * channels, (STD,) * channels
    if name == "imagenet":
        if channels == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return (round(sum(IMAGENET_MEAN) / 3, 4),) * channels, (
            round(sum(IMAGENET_STD) / 3, 4),
        ) * channels
    raise DataError(f"normalization: expected 'medmnist' or 'imagenet', got {name!r}")


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """One (H, W) or (H, W, C) uint8 image as (H, W, channels)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise DataError(f"image: expected 2 or 3 dimensions (H, W[, C]), got shape {image.shape}")
    have = image.shape[2]
    if have == 4:  # RGBA: drop alpha
        image, have = image[:, :, :3], 3
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=2)
    if have == 3 and channels == 1:
        grey = Image.fromarray(image, mode="RGB").convert("L")
        return np.asarray(grey)[:, :, None]
    raise DataError(f"image: cannot turn {have} channel(s) into the {channels} the model expects")


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C) float32 in [0, 255], bilinear per channel."""
    if image.shape[0] == size and image.shape[1] == size:
        return image.astype(np.float32)
    planes = [
        np.asarray(
            Image.fromarray(image[:, :, c]).resize((size, size), Image.Resampling.BILINEAR),
            dtype=np.float32,
        )
        for c in range(image.shape[2])
    ]
    return np.stack(planes, axis=2)


def to_model_input(
    images: np.ndarray,
    image_size: int,
    channels: int,
    *,
    mean: tuple[float, ...] = (MEAN,),
    std: tuple[float, ...] = (STD,),
) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> normalised float32 (N, channels, image_size, image_size)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"images: expected dtype uint8, got {images.dtype}")
    if images.ndim not in (3, 4) or len(images) == 0:
        raise DataError(
            f"images: expected a non-empty (N, H, W[, C]) array, got shape {images.shape}"
        )
    out = np.empty((len(images), channels, image_size, image_size), dtype=np.float32)
    for i, image in enumerate(images):
        resized = _resize(_to_channels(image, channels), image_size)
        out[i] = resized.transpose(2, 0, 1)
    out /= 255.0
    out -= np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    out /= np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return out
