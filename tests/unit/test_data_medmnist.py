"""MedMNIST loading, the shared preprocessing, and image reading (PNG, JPEG, .npy, DICOM
from pydicom's own test files and ../shared/data): real files, real errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.pipeline import write_medmnist_npz
from training.data import DataOptions, known_datasets, medmnist_arrays, npz_path, open_split
from training.errors import ConfigError, DataError
from training.images import read_dicom_ids, read_image, read_image_bytes
from training.transforms import normalize, resize_to_uint8, to_model_input


def test_medmnist_arrays_are_the_npz_as_stored(data_dir: Path) -> None:
    raw = np.load(npz_path("pneumoniamnist", data_dir))
    images, labels = medmnist_arrays("pneumoniamnist", "val", data_dir)
    assert images.dtype == np.uint8 and images.shape == raw["val_images"].shape
    assert labels.shape == (len(images), 1)
    np.testing.assert_array_equal(images, raw["val_images"])
    np.testing.assert_array_equal(labels[:, 0], raw["val_labels"][:, 0])


def test_open_split_preprocesses_and_stratifies(data_dir: Path) -> None:
    split = open_split(
        DataOptions("pneumoniamnist", str(data_dir)), "train", image_size=40, max_samples=50
    )
    x = split.model_input((0.5,), (0.5,))
    assert x.shape == (50, 1, 40, 40) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert set(np.unique(split.labels[:, 0])) == {0, 1}


def test_missing_file_names_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        medmnist_arrays("pneumoniamnist", "train", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "pneumoniamnist.npz") in message and str(tmp_path) in message


def test_unknown_dataset_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        medmnist_arrays("lungmnist", "train", tmp_path)
    assert "lungmnist" in str(err.value)
    for name in ("pneumoniamnist", "breastmnist", "chestmnist"):
        assert name in str(err.value) and name in known_datasets()


def test_labels_out_of_range_are_refused(tmp_path: Path) -> None:
    path = write_medmnist_npz(
        tmp_path / "pneumoniamnist.npz", {"train": 8, "val": 4, "test": 4}, n_classes=3
    )
    with pytest.raises(DataError, match=r"train_labels must lie in 0\.\.1"):
        medmnist_arrays("pneumoniamnist", "train", tmp_path)
    assert path.exists()


def test_to_model_input_resizes_and_normalises() -> None:
    grey = np.full((2, 28, 28), 255, dtype=np.uint8)
    out = to_model_input(grey, 64, 1)
    assert out.shape == (2, 1, 64, 64)
    np.testing.assert_allclose(out, 1.0)
    rgb = np.zeros((1, 50, 70, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red -> luminance 76
    out = to_model_input(rgb, 32, 1)
    np.testing.assert_allclose(out, (76 / 255 - 0.5) / 0.5, atol=1e-6)
    assert to_model_input(grey, 32, 3).shape == (2, 3, 32, 32)
    with pytest.raises(DataError, match="uint8"):
        to_model_input(grey.astype(np.float32), 32, 1)


def test_read_image_formats(tmp_path: Path) -> None:
    array = (np.arange(40 * 30) % 256).astype(np.uint8).reshape(40, 30)
    Image.fromarray(array).save(tmp_path / "a.png")
    Image.fromarray(np.stack([array] * 3, axis=2)).save(tmp_path / "b.jpg", quality=95)
    np.save(tmp_path / "c.npy", array.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), array)
    assert read_image(tmp_path / "b.jpg").shape == (40, 30, 3)
    np.testing.assert_array_equal(read_image(tmp_path / "c.npy"), array)


def test_read_image_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.png"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(DataError, match=r"missing\.png"):
        read_image(tmp_path / "missing.png")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(DataError, match=r"cube.npy.*\(2, 3, 4, 5\)"):
        read_image(tmp_path / "cube.npy")


SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "samples"


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear window onto 0..255, written out independently."""
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.round(scaled), 0, 255)


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name))


def test_transforms_split_into_resize_and_normalize() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
    small = resize_to_uint8(rgb, 32, 3)
    assert small.dtype == np.uint8 and small.shape == (3, 3, 32, 32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    np.testing.assert_array_equal(
        normalize(small, mean, std), to_model_input(rgb, 32, 3, mean=mean, std=std)
    )
    mixed = resize_to_uint8([rgb[0], rgb[1, :20, :30, 0]], 32, 1)  # different sizes, grey + RGB
    assert mixed.shape == (2, 1, 32, 32)
    with pytest.raises(DataError, match=r"mean: expected 1 or 3 value\(s\).*got 2"):
        normalize(small, (0.5, 0.5), (0.5,))


def test_dicom_chest_radiograph_and_its_identifiers() -> None:
    import pydicom

    path = SAMPLES / "chest_xray.dcm"
    if not path.exists():
        pytest.skip("../shared/data/samples is absent")
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (1024, 1024)
    np.testing.assert_array_equal(image, pydicom.dcmread(path).pixel_array)  # 8-bit, no window
    np.testing.assert_array_equal(read_image_bytes(path.read_bytes()), image)
    ids = read_dicom_ids(path)
    assert ids["PatientID"] == "16d7f894-55d7-4d95-8957-d18987f0e981" and ids["Modality"] == "CR"
    assert ids["StudyInstanceUID"].startswith("1.2.276.") and "AccessionNumber" not in ids


def test_dicom_modality_lut_then_window_on_signed_16_bit_ct(tmp_path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    plain = read_image(_testdata("CT_small.dcm"))  # no window: the image's own HU range
    expected = np.round((hu - hu.min()) * 255.0 / (hu.max() - hu.min()))
    np.testing.assert_array_equal(plain, expected)
    ds.WindowCenter, ds.WindowWidth = 40, 400  # soft-tissue window, in HU
    ds.save_as(tmp_path / "ct_window.dcm")
    windowed = read_image(tmp_path / "ct_window.dcm")
    np.testing.assert_allclose(windowed, _window(hu, 40, 400), atol=1)
    assert windowed.min() == 0 and windowed.max() == 255 and not np.array_equal(windowed, plain)


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(_testdata("MR_small.dcm"))
    as_is = read_image(_testdata("MR_small.dcm"))  # MONOCHROME2 with a window 600 / 1600
    np.testing.assert_allclose(as_is, _window(ds.pixel_array.astype(float), 600, 1600), atol=1)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    inverted = read_image(tmp_path / "mono1.dcm")
    np.testing.assert_allclose(inverted.astype(int), 255 - as_is.astype(int), atol=1)
    assert inverted.std() > 10


def test_dicom_16_bit_unsigned_multiframe_and_no_preamble_name(tmp_path: Path) -> None:
    import pydicom

    from tests.fixtures.data import write_dicom

    pixels = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 3 + 100).astype(np.uint16)
    write_dicom(tmp_path / "u16.dcm", pixels)
    expected = np.round((pixels - 100.0) * 255.0 / (pixels.max() - 100.0))
    np.testing.assert_array_equal(read_image(tmp_path / "u16.dcm"), expected)
    (tmp_path / "scan.bin").write_bytes((tmp_path / "u16.dcm").read_bytes())  # found by DICM
    np.testing.assert_array_equal(read_image(tmp_path / "scan.bin"), expected)
    frames = pydicom.dcmread(_testdata("SC_rgb_rle_2frame.dcm")).pixel_array
    assert frames.shape[0] == 2 and not np.array_equal(frames[0], frames[1])
    np.testing.assert_array_equal(read_image(_testdata("SC_rgb_rle_2frame.dcm")), frames[0])


def test_dicom_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"rtplan\.dcm: DICOM file without pixel data"):
        read_image(_testdata("rtplan.dcm"))
    (tmp_path / "fake.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01" * 20)
    with pytest.raises(DataError, match=r"fake\.dcm"):
        read_image(tmp_path / "fake.dcm")
    with pytest.raises(DataError, match=r"upload\.png: not a readable image") as err:
        read_image_bytes(b"<!DOCTYPE html>", "upload.png")
    assert "b'<!DOCTYPE html>'" in str(err.value) and "BytesIO" not in str(err.value)
    with pytest.raises(DataError, match=r"a\.png: not a DICOM file"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
        read_dicom_ids(tmp_path / "a.png")


def test_read_image_bytes_matches_read_image(tmp_path: Path) -> None:
    array = (np.arange(40 * 30) % 256).astype(np.uint8).reshape(40, 30)
    Image.fromarray(array).save(tmp_path / "a.png")
    Image.fromarray(np.stack([array] * 3, axis=2)).save(tmp_path / "b.jpg", quality=95)
    np.save(tmp_path / "c.npy", array)
    for name in ("a.png", "b.jpg", "c.npy"):
        data = (tmp_path / name).read_bytes()
        np.testing.assert_array_equal(read_image_bytes(data), read_image(tmp_path / name))
    ct = _testdata("CT_small.dcm")
    np.testing.assert_array_equal(read_image_bytes(ct.read_bytes(), "x"), read_image(ct))
