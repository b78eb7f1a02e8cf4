"""The one preprocessing path, shared by training, export parity checks and clients.

uint8 images of any size (N, H, W) or (N, H, W, C) become float32 (N, C, S, S) in
two steps: :func:`resize_to_uint8` converts channels and resizes with PIL's bilinear
filter to uint8 (N, C, S, S) (what data sets keep and cache), then :func:`normalize`
scales to [0, 1] and applies ``(x - mean) / std`` per channel (what the training loop
does batched, and :func:`to_model_input` does for everything else).

A model trained on a data set made from larger images (MedMNIST: each source image
centre-cropped to the square of its short edge -- PneumoniaMNIST, OCTMNIST, RetinaMNIST --
or not, then reduced to 28..224 px) first sends a larger input image through the same
reduction (:class:`SourceChain`: the crop, then Pillow's antialiased bicubic filter to the
data set's file resolution), so a full-size chest X-ray reaches the network as the training
images did. MedMNIST names the crops (its ``INFO`` descriptions, ``on_medmnist_plus.md``)
but not the filter; bicubic is our choice, said here. An image no larger than the file
resolution is left as it is::

    python -c "import numpy as np; from training.transforms import to_model_input; \
print(to_model_input(np.zeros((2, 28, 28), np.uint8), 64, 1).shape)"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


CROPS = ("none", "center")


@dataclass(frozen=True)
class SourceChain:
    """How a data set's images were made from larger ones: ``crop`` ("center": the centred
    square of the short edge; "none") then a reduction to ``size`` px (0: no reduction)."""

    crop: str = "none"
    size: int = 0

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise DataError(f"crop: expected one of {list(CROPS)}, got {self.crop!r}")

    def apply(self, image: np.ndarray) -> np.ndarray:
        """One (H, W, C) uint8 image through the chain; unchanged when it is no larger
        than ``size`` (or, without a size, when no crop is asked for)."""
        h, w = image.shape[:2]
        larger = self.size and max(h, w) > self.size
        if not larger and not (self.crop == "center" and not self.size):
            return image
        if self.crop == "center" and h != w:
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            image = image[top : top + side, left : left + side]
        if not larger:
            return image
        return np.stack(
            [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(image[:, :, c])).resize(
                        (self.size, self.size), Image.Resampling.BICUBIC
                    )
                )
                for c in range(image.shape[2])
            ],
            axis=2,
        )


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
    """(H, W, C) uint8 -> (C, size, size) uint8, PIL bilinear per channel."""
    if image.shape[0] == size and image.shape[1] == size:
        return image.transpose(2, 0, 1)
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[:, :, c])).resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
        for c in range(image.shape[2])
    ]
    return np.stack(planes, axis=0)


def resize_image(
    image: np.ndarray, image_size: int, channels: int, source: SourceChain | None = None
) -> np.ndarray:
    """One uint8 (H, W[, C]) image -> uint8 (channels, image_size, image_size), through
    ``source`` first when given."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise DataError(f"image: expected dtype uint8, got {image.dtype}")
    image = _to_channels(image, channels)
    if source is not None:
        image = source.apply(image)
    return _resize(image, image_size)


def resize_to_uint8(
    images: np.ndarray | Sequence[np.ndarray],
    image_size: int,
    channels: int,
    source: SourceChain | None = None,
) -> np.ndarray:
    """uint8 (N, H, W[, C]) -- or a sequence of differently sized uint8 (H, W[, C]) images --
    -> uint8 (N, channels, image_size, image_size): channels converted, then resized."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise DataError(f"images: expected dtype uint8, got {images.dtype}")
        if images.ndim not in (3, 4) or len(images) == 0:
            raise DataError(
                f"images: expected a non-empty (N, H, W[, C]) array, got shape {images.shape}"
            )
    elif len(images) == 0:
        raise DataError("images: expected at least one image, got none")
    out = np.empty((len(images), channels, image_size, image_size), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = resize_image(image, image_size, channels, source)
    return out


def normalize(
    images: np.ndarray,
    mean: Sequence[float] = (MEAN,),
    std: Sequence[float] = (STD,),
) -> np.ndarray:
    """uint8 (N, C, S, S) -> float32 ``(x / 255 - mean) / std``, per channel (one value: all)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"images: expected uint8 (N, C, S, S), got {images.dtype} {images.shape}")
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, images.shape[1]):
            raise DataError(
                f"{name}: expected 1 or {images.shape[1]} value(s) (one per channel), "
                f"got {len(values)}"
            )
    out = images.astype(np.float32)
    out /= 255.0
    out -= np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    out /= np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return out


def to_model_input(
    images: np.ndarray,
    image_size: int,
    channels: int,
    *,
    mean: tuple[float, ...] = (MEAN,),
    std: tuple[float, ...] = (STD,),
    source: SourceChain | None = None,
) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> normalised float32 (N, channels, image_size, image_size):
    ``normalize(resize_to_uint8(images, image_size, channels, source), mean, std)``."""
    return normalize(resize_to_uint8(images, image_size, channels, source), mean, std)
