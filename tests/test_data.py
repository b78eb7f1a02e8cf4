"""MedMNIST loading, the shared preprocessing, and image reading: real files, real errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_fixtures import write_medmnist_npz

from training.data import known_datasets, load_split, npz_path, prepare_split
from training.errors import ConfigError, DataError
from training.images import read_image
from training.transforms import to_model_input


def test_load_split_reads_medmnist_npz(data_dir: Path) -> None:
    raw = np.load(npz_path("pneumoniamnist", data_dir))
    images, labels = load_split("pneumoniamnist", "val", data_dir)
    assert images.dtype == np.uint8 and images.shape == raw["val_images"].shape
    assert labels.shape == (len(images), 1)
    np.testing.assert_array_equal(images, raw["val_images"])
    np.testing.assert_array_equal(labels[:, 0], raw["val_labels"][:, 0])


def test_prepare_split_preprocesses_and_stratifies(data_dir: Path) -> None:
    split = prepare_split("pneumoniamnist", "train", data_dir, image_size=40, max_samples=50)
    assert split.x.shape == (50, 1, 40, 40) and split.x.dtype == np.float32
    assert split.x.min() >= -1.0 and split.x.max() <= 1.0
    assert set(np.unique(split.y[:, 0])) == {0, 1}


def test_missing_file_names_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_split("pneumoniamnist", "train", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "pneumoniamnist.npz") in message and str(tmp_path) in message


def test_unknown_dataset_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_split("lungmnist", "train", tmp_path)
    assert "lungmnist" in str(err.value)
    for name in ("pneumoniamnist", "breastmnist", "chestmnist"):
        assert name in str(err.value) and name in known_datasets()


def test_labels_out_of_range_are_refused(tmp_path: Path) -> None:
    path = write_medmnist_npz(
        tmp_path / "pneumoniamnist.npz", {"train": 8, "val": 4, "test": 4}, n_classes=3
    )
    with pytest.raises(DataError, match=r"train_labels must lie in 0\.\.1"):
        load_split("pneumoniamnist", "train", tmp_path)
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
