"""Read image files -- PNG, JPEG, DICOM, NumPy ``.npy`` -- as uint8 arrays: one file
(:func:`read_image`), bytes (:func:`read_image_bytes`, same code), or many files
decoded, resized and cached at once (:func:`read_images`).

DICOM (a ``.dcm``/``.dicom`` name, or the ``DICM`` preamble) goes through pydicom:
the Modality LUT (rescale slope/intercept, or a LUT), then the VOI LUT or the first
window (centre/width), MONOCHROME1 inverted so that bright means dense, and a scale
to 0..255 from the VOI output range (the window's full range), else -- no window --
the image's own min..max (8-bit data without rescale is kept as stored). This covers
16-bit and signed data. Multi-frame files give their FIRST frame only. Colour DICOMs
come out RGB (YBR converted, palette colour applied). A DICOM without pixel data is
a :class:`DataError` naming the file. :func:`read_dicom_ids` reads the identifiers
(PatientID, StudyInstanceUID, AccessionNumber, ...) without the pixels::

    python -c "from training.images import read_image; print(read_image('../shared/data/samples/chest_xray.dcm').shape)"
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.errors import DataError
from training.transforms import SourceChain, resize_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
DICOM_IDS = "PatientID StudyInstanceUID SeriesInstanceUID SOPInstanceUID AccessionNumber Modality"
CACHE_VERSION = 1  # bump when decoding or resizing changes: old cache entries are then ignored


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
    return _to_uint8(array, float(array.min()), float(array.max()))


def _to_uint8(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map lo..hi linearly onto 0..255 (clipped)."""
    if hi == lo:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (array.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def is_dicom(data: bytes, name: str = "") -> bool:
    """The DICM preamble, or a ``.dcm``/``.dicom`` name."""
    return data[128:132] == b"DICM" or Path(name).suffix.lower() in DICOM_SUFFIXES


def _window_range(ds) -> tuple[float, float]:
    """The output range pydicom's ``apply_windowing`` maps a window onto."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    bits = int(ds.BitsStored)
    lo, hi = (
        (0.0, 2.0**bits - 1)
        if ds.PixelRepresentation == 0
        else (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    )
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = lo * slope + intercept, hi * slope + intercept
    return lo, hi


def _dicom_pixels(ds, name: str) -> np.ndarray:
    """First frame of a decoded DICOM data set as (H, W) grey or (H, W, 3) RGB uint8."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(
            f"{name}: DICOM file without pixel data (modality {ds.get('Modality', '?')}, "
            f"SOP class {ds.get('SOPClassUID', '?')}); an image is expected"
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        arr = pixel_array(ds, index=0)  # first frame only of multi-frame data
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
            return arr if arr.dtype == np.uint8 else _to_uint8(arr, 0, np.iinfo(arr.dtype).max)
        if not photometric.startswith("MONOCHROME"):  # RGB, or YBR converted to RGB by pydicom
            bits = int(ds.get("BitsStored") or 8)
            return arr if arr.dtype == np.uint8 else _to_uint8(arr, 0, 2.0**bits - 1)
        arr = apply_modality_lut(arr, ds)
        voi = ds.get("VOILUTSequence")
        if voi and voi[0].get("LUTDescriptor") and voi[0].get("LUTData") is not None:
            lo, hi = 0.0, 2.0 ** int(voi[0].LUTDescriptor[2]) - 1
            arr = apply_voi_lut(arr, ds)
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            lo, hi = _window_range(ds)
            arr = apply_voi_lut(arr, ds)
        elif arr.dtype == np.uint8:  # no rescale, no window: 8-bit data as stored
            lo, hi = 0.0, 2.0 ** int(ds.get("BitsStored") or 8) - 1
        else:
            lo, hi = float(arr.min()), float(arr.max())
    except Exception as exc:  # pydicom and its decoders raise many types
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise DataError(
            f"{name}: cannot decode the DICOM pixel data (transfer syntax {syntax}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if photometric == "MONOCHROME1":  # low values are bright: invert within the output range
        arr = lo + hi - arr.astype(np.float64)
    if arr.ndim != 2:
        raise DataError(f"{name}: expected one grey (rows, columns) frame, got shape {arr.shape}")
    return _to_uint8(arr, lo, hi)


def _read_dicom(data: bytes, name: str) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise DataError(f"{name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    return _dicom_pixels(ds, name)


def _read_npy(data: bytes, name: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{name}: not a NumPy .npy array ({exc})") from exc
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise DataError(
            f"{name}: expected an (H, W) or (H, W, C) image array, got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{name}: expected a numeric array, got dtype {array.dtype}")
    return _scale_to_uint8(array)


def _read_pil(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                return _scale_to_uint8(np.asarray(img, dtype=np.int32))
            if img.mode in ("1", "LA"):
                return np.asarray(img.convert("L"))
            if img.mode not in ("L", "RGB"):
                return np.asarray(img.convert("RGB"))
            return np.asarray(img)
    except UnidentifiedImageError as exc:  # PIL's text names only its BytesIO object
        raise DataError(
            f"{name}: not a readable image (PNG, JPEG, DICOM or .npy expected; "
            f"its first bytes are {data[:16]!r})"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"{name}: not a readable image (PNG, JPEG, DICOM or .npy expected): {exc}"
        ) from exc


def read_image_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode PNG, JPEG, DICOM or ``.npy`` bytes to (H, W) or (H, W, C) uint8; ``name``
    appears in errors (and a ``.dcm`` name selects DICOM without the preamble)."""
    if is_dicom(data, name):
        return _read_dicom(data, name)
    if data[:6] == b"\x93NUMPY":
        return _read_npy(data, name)
    return _read_pil(data, name)


def read_image(path: str | Path) -> np.ndarray:
    """Return (H, W) or (H, W, C) uint8; raise :class:`DataError` naming the file otherwise.

    16-bit PNGs and non-uint8 arrays are rescaled to 0..255 (floats in [0, 1] by x255);
    DICOM as described in the module docstring.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return read_image_bytes(path.read_bytes(), str(path))


def read_dicom_ids(path: str | Path) -> dict[str, str]:
    """Those of :data:`DICOM_IDS` that the file holds, non-empty (pixels are not read)."""
    import pydicom

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "SOPClassUID" not in ds and "PatientID" not in ds and "StudyInstanceUID" not in ds:
        raise DataError(f"{path}: not a DICOM file (no SOP class, patient or study found)")
    ids = {key: str(ds.get(key, "") or "").strip() for key in DICOM_IDS.split()}
    return {key: value for key, value in ids.items() if value}


@dataclass(frozen=True)
class DecodedImages:
    """:func:`read_images`' result: the images that decoded, and which did not."""

    images: np.ndarray  # uint8 (K, C, S, S), memory-mapped from the cache when there is one
    failed: tuple[int, ...]  # indices into the given paths that could not be decoded
    reasons: tuple[str, ...]  # one error message per failed index


def _cache_key(
    paths: Sequence[str | Path], image_size: int, channels: int, crop: str = "none"
) -> str:
    files = []
    for p in paths:
        try:
            st = os.stat(p)
            files.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            files.append((str(p), -1, -1))
    key = [CACHE_VERSION, image_size, channels, files] + ([crop] if crop != "none" else [])
    blob = json.dumps(key).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX), so concurrent workers decode a data set once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_cached(npy: Path, meta: Path, n: int, shape: tuple[int, ...]) -> DecodedImages | None:
    if not (npy.exists() and meta.exists()):
        return None
    try:
        info = json.loads(meta.read_text())
        images = np.load(npy, mmap_mode="r")
        if images.shape == (n - len(info["failed"]), *shape):
            return DecodedImages(images, tuple(info["failed"]), tuple(info["reasons"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable image cache %s: %s", npy, exc)
    return None


def _decode_into(
    out: np.ndarray, paths: Sequence, size: int, channels: int, desc: str, crop: str = "none"
) -> dict:
    """Decode, crop (``crop``: training.transforms.SourceChain) and resize every path into
    ``out`` with a few threads; {index: error}."""
    source = SourceChain(crop) if crop != "none" else None
    from tqdm import tqdm

    failures: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            out[i] = resize_image(read_image(paths[i]), size, channels, source)
        except Exception as exc:  # an undecodable file is skipped, whatever the decoder raised
            failures[i] = str(exc) if isinstance(exc, DataError) else f"{paths[i]}: {exc!r}"

    threads = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(paths), desc=desc, unit="img") as bar:
        for _ in pool.map(work, range(len(paths))):
            bar.update()
    return failures


def _result(images: np.ndarray, failures: dict[int, str]) -> DecodedImages:
    failed = sorted(failures)
    return DecodedImages(images, tuple(failed), tuple(failures[i] for i in failed))


def _decode_cached(
    paths: Sequence, size: int, channels: int, cache: Path, desc: str, crop: str = "none"
):
    n, shape = len(paths), (channels, size, size)
    key = _cache_key(paths, size, channels, crop)
    npy, meta = cache / f"images-{key}.npy", cache / f"images-{key}.json"
    with _locked(cache / f"images-{key}.lock"):
        found = _load_cached(npy, meta, n, shape)
        if found is not None:
            return found
        tmp = cache / f"images-{key}.{os.getpid()}.{threading.get_ident()}.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *shape))
        failures = _decode_into(out, paths, size, channels, desc, crop)
        keep = [i for i in range(n) if i not in failures]
        if failures:  # rare: keep only the decoded images (through memory)
            packed = np.asarray(out[keep])
            del out
            os.remove(tmp)
            if not keep:
                return _result(packed, failures)
            np.save(tmp, packed)
        else:
            out.flush()
            del out
        meta_tmp = tmp.with_suffix(".json")
        failed = sorted(failures)
        meta_tmp.write_text(
            json.dumps({"failed": failed, "reasons": [failures[i] for i in failed]})
        )
        os.replace(meta_tmp, meta)
        os.replace(tmp, npy)
    return _result(np.load(npy, mmap_mode="r"), failures)


def read_images(
    paths: Sequence[str | Path],
    image_size: int,
    channels: int,
    *,
    cache_dir: str | Path = "",
    desc: str = "decoding images",
    crop: str = "none",
) -> DecodedImages:
    """Decode and resize (:func:`~training.transforms.resize_image`) every file once.

    With ``cache_dir`` the uint8 result is stored there as ``images-<key>.npy`` (+ ``.json``
    listing failures), key = hash of (paths, mtimes, sizes, image_size, channels), written
    atomically (temporary file + rename, under a file lock) and loaded memory-mapped, so
    that several processes share it. An undecodable file does not stop the others: it is
    reported in ``failed``/``reasons``. An unusable cache directory falls back to memory.
    """
    if cache_dir and len(paths):
        cache = Path(cache_dir).expanduser()
        try:
            cache.mkdir(parents=True, exist_ok=True)
            return _decode_cached(paths, image_size, channels, cache, desc, crop)
        except OSError as exc:
            log.warning("image cache %s not usable (%s); decoding in memory", cache, exc)
    out = np.empty((len(paths), channels, image_size, image_size), dtype=np.uint8)
    failures = _decode_into(out, paths, image_size, channels, desc, crop)
    keep = [i for i in range(len(paths)) if i not in failures]
    return _result(out[keep] if failures else out, failures)
