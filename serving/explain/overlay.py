"""Overlays: an image with its class activation map upsampled (bilinear) over it, a colour
bar, and a title with the predicted label, its probability and the class explained; one PNG
per image (:func:`write_overlays`, what ``medimg explain`` and ``label`` / ``triage
--explain`` write)::

    python -c "import numpy as np; from serving.explain.maps import Explanation; \
from serving.explain.overlay import render_overlay; \
e = Explanation('x.png', 'pneumonia', {'normal': 0.2, 'pneumonia': 0.8}, 'pneumonia', \
np.arange(4, dtype=np.float32).reshape(2, 2)); \
open('overlay.png', 'wb').write(render_overlay(np.zeros((64, 64), np.uint8), e))"
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serving.clients.inputs import Item
from serving.explain.maps import Explainer, Explanation, ServerExplainer
from serving.repository.layout import check_writable, write_atomic
from training.errors import DataError, MedimgError
from training.images import read_image

if TYPE_CHECKING:
    from serving.clients.sync import TritonClassifier

MAX_SIDE = 512  # larger images are drawn at this size (the map is coarser anyway)
ALPHA = 0.45  # the heatmap's opacity over the image
COLORMAP = "jet"


def upsample(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D map to (height, width), as ``torch.nn.functional.interpolate``
    (``mode="bilinear", align_corners=False``): pixel centres aligned, edges held."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.ndim != 2 or min(heatmap.shape) < 1 or height < 1 or width < 1:
        raise DataError(f"heatmap: expected a non-empty 2-D map, got shape {heatmap.shape}")

    def axis(size: int, source: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.maximum((np.arange(size) + 0.5) * (source / size) - 0.5, 0.0)
        low = np.minimum(np.floor(x).astype(int), source - 1)
        return low, np.minimum(low + 1, source - 1), x - low

    r0, r1, fr = axis(height, heatmap.shape[0])
    c0, c1, fc = axis(width, heatmap.shape[1])
    top = heatmap[r0][:, c0] * (1 - fc) + heatmap[r0][:, c1] * fc
    bottom = heatmap[r1][:, c0] * (1 - fc) + heatmap[r1][:, c1] * fc
    return (top * (1 - fr)[:, None] + bottom * fr[:, None]).astype(np.float32)


def display_image(item: Item) -> np.ndarray:
    """The item's image as uint8 (H, W) or (H, W, 3), at most :data:`MAX_SIDE` a side.
    The model sees it resized to a square, so the map is stretched to its shape."""
    from PIL import Image

    image = item.image if item.image is not None else read_image(item.path or Path(item.name))
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    elif image.ndim == 3 and image.shape[2] != 3:
        image = image[..., :3] if image.shape[2] > 3 else np.repeat(image[..., :1], 3, axis=2)
    h, w = image.shape[:2]
    if max(h, w) > MAX_SIDE:
        scale = MAX_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    return image


def render_overlay(image: np.ndarray, explained: Explanation) -> bytes:
    """PNG bytes: ``image`` in grey (or colour), the heatmap upsampled to it in
    :data:`COLORMAP` at :data:`ALPHA`, a colour bar of the map's values, and the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if explained.heatmap is None:
        raise DataError(f"{explained.file}: no map to draw ({explained.error or 'none'})")
    h, w = image.shape[:2]
    heat = upsample(explained.heatmap, h, w)
    fig = Figure(figsize=(6.0, 5.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    shown = ax.imshow(heat, cmap=COLORMAP, alpha=ALPHA, interpolation="nearest")
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(
        "class activation (share of the calibrated logit)"
        if explained.method == "cam"
        else f"Grad-CAM, {explained.method.removeprefix('gradcam ')} (scaled to [0, 1])"
    )
    what = "CAM" if explained.method == "cam" else "Grad-CAM"
    ax.set_title(
        f"predicted {explained.label} (p = {explained.probability:.3f})\n"
        f"{what} of {explained.explained} (p = {explained.explained_probability:.3f})",
        fontsize=11,
    )
    ax.set_axis_off()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def overlay_name(item: Item, method: str, taken: set[str]) -> str:
    """A file name for the item's overlay, unique within ``taken`` (which it joins):
    ``<file stem>.<method>.png``, ``-2``, ``-3``, ... after a repeated stem."""
    base = Path(item.name).stem if item.path is not None else Path(item.name).name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "image"
    kind = re.sub(r"[^A-Za-z0-9.-]+", "-", method)
    name, n = f"{stem}.{kind}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.{kind}.png"
    taken.add(name)
    return name


def write_overlays(
    source: TritonClassifier | Explainer,
    items: Sequence[Item],
    directory: str | Path,
    *,
    class_name: str = "",
    batch_size: int = 0,
    mode: int = 0o600,
) -> list[Explanation]:
    """Explain every item and write its overlay PNG into ``directory`` (created; files of
    ``mode``, by default readable by their owner only: they show patients' images).

    ``source``: a connected :class:`~serving.clients.sync.TritonClassifier` (the server's
    ``cam`` output; a model without one is a :class:`ServingError` saying to re-export it),
    or an explainer (:class:`~serving.explain.maps.ServerExplainer`,
    :class:`~serving.explain.maps.LocalExplainer`). ``class_name``: the class whose map is
    drawn ("" : each image's predicted class). Returns one :class:`Explanation` per item, in
    order, with ``path`` set, or ``error`` for an item that could not be read, sent or drawn.
    """
    from serving.clients.sync import TritonClassifier

    explainer = ServerExplainer(source) if isinstance(source, TritonClassifier) else source
    directory = Path(directory)
    check_writable(directory, f"overlay directory {directory}")
    explained = explainer.explain(items, class_name, batch_size)
    taken: set[str] = set()
    for item, one in zip(items, explained, strict=True):
        if one.error:
            continue
        try:
            png = render_overlay(display_image(item), one)
            path = directory / overlay_name(item, one.method, taken)
            write_atomic(path, png, mode=mode)
            one.path = path
        except (MedimgError, OSError) as exc:
            one.error = f"{item.name}: overlay not written: {exc}"
    return explained
