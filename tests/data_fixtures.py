"""Generators of small data sets in their official layouts, for tests/test_datasets.py.

MedMNIST ``.npz`` files shaped from ``medmnist.INFO``; class-per-folder image trees
(PNG, JPEG, DICOM); NIH ChestX-ray14 directories that pair real rows of the label file
in ``../shared/data`` (symlinked, never copied) with generated images -- or, without
that folder, a generated label file in the same format.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CXR14_CSV = SHARED_DATA / "chestxray14" / "Data_Entry_2017_v2020.csv.gz"
NIH_SAMPLES = ("00000001_000.png", "00027426_000.png")
CXR14_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
SIZE = ("2500", "2048", "0.143", "0.143")


def write_medmnist_like(path: Path, flag: str, counts: dict[str, int], size: int = 28) -> Path:
    """An npz in the official layout of ``flag``: images (N, S, S[, 3]) uint8, labels
    (N, 1) class indices or (N, n_classes) 0/1 for multi-label, as ``medmnist.INFO`` says."""
    import medmnist

    info = medmnist.INFO[flag]
    n_classes, channels = len(info["label"]), info["n_channels"]
    rng = np.random.default_rng(len(flag) + size)
    arrays = {}
    for split, n in counts.items():
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if info["task"].startswith("multi-label"):
            labels = (rng.random((n, n_classes)) < 0.3).astype(np.uint8)
        else:
            labels = (np.arange(n) % n_classes).astype(np.uint8)[:, None]
        arrays[f"{split}_labels"] = labels
    np.savez_compressed(path, **arrays)
    return path


def class_image(label: int, index: int, size: int = 24, rgb: bool = False) -> np.ndarray:
    """A distinct image per (label, index): grey level by class, a bright square by index."""
    image = np.full((size, size), 40 + 50 * label, dtype=np.uint8)
    r = index % (size - 6)
    image[r : r + 6, 2:8] = 250
    if rgb:
        return np.stack([image, image // 2, 255 - image], axis=2)
    return image


def write_dicom(path: Path, pixels: np.ndarray, **elements) -> Path:
    """A minimal valid DICOM file (secondary capture, explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.PatientID, ds.StudyInstanceUID, ds.Modality = "P1", generate_uid(), "OT"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.set_pixel_data(pixels, "MONOCHROME2", bits)
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def write_image_tree(
    root: Path, counts: dict[str, int], *, rgb: bool = False, suffix: str = ".png"
) -> dict[str, list[Path]]:
    """``root/<class>/<class>_<i><suffix>`` for each class count; returns the files."""
    files: dict[str, list[Path]] = {}
    for label, (name, n) in enumerate(sorted(counts.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        files[name] = []
        for i in range(n):
            path = root / name / f"{name}_{i:03d}{suffix}"
            image = class_image(label, i, rgb=rgb)
            if suffix == ".dcm":
                write_dicom(path, image)
            else:
                Image.fromarray(image).save(path, quality=95)
            files[name].append(path)
    return files


def cxr14_rows(max_patient: int = 61) -> list[list[str]]:
    """Rows of the real label file for patients 1..max_patient (290 rows for 61) and the
    NIH samples' rows, or generated rows in that format when ``../shared/data`` is absent."""
    if CXR14_CSV.exists():
        with gzip.open(CXR14_CSV, "rt", newline="") as handle:
            reader = csv.reader(handle)
            next(reader)
            return [r for r in reader if int(r[3]) <= max_patient or r[0] in NIH_SAMPLES]
    rng = np.random.default_rng(0)
    findings = ("Cardiomegaly", "Effusion", "Infiltration", "Mass", "Hernia", "Pleural_Thickening")
    rows = []
    for patient in range(1, max_patient + 1):
        for follow_up in range(int(rng.integers(1, 9))):
            picked = sorted({str(f) for f in rng.choice(findings, int(rng.integers(0, 3)))})
            label = "|".join(picked) or "No Finding"
            name = f"{patient:08d}_{follow_up:03d}.png"
            rows.append([name, label, str(follow_up), str(patient), "50", "M", "PA", *SIZE])
    return [*rows, ["00027426_000.png", "No Finding", "0", "27426", "53", "M", "PA", *SIZE]]


def write_cxr14(root: Path, rows: list[list[str]], *, layout: str = "images_00N") -> Path:
    """A ChestX-ray14 directory: the label file (a symlink to the real one when it exists,
    else ``rows`` written in its format), a 24 px PNG per row in ``images/`` or spread over
    ``images_001/images``, ``images_002/images``, and the two real NIH images symlinked."""
    root.mkdir(parents=True, exist_ok=True)
    if CXR14_CSV.exists():
        (root / CXR14_CSV.name).symlink_to(CXR14_CSV)
    else:
        with gzip.open(root / CXR14_CSV.name, "wt", newline="") as handle:
            handle.write(CXR14_HEADER + "\n")
            csv.writer(handle, lineterminator="\n").writerows(rows)
    for i, row in enumerate(rows):
        folder = root / "images" if layout == "images" else root / f"images_00{1 + i % 2}/images"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / row[0]
        if row[0] in NIH_SAMPLES and (SHARED_DATA / "samples" / row[0]).exists():
            target.symlink_to(SHARED_DATA / "samples" / row[0])
        else:
            Image.fromarray(class_image(len(row[1]) % 5, i)).save(target)
    return root
