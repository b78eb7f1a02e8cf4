"""A full-size image goes through the chain that made the training images (MedMNIST: the
short edge's centred square, reduced to the file resolution) before the usual resize;
an image already at that resolution is untouched by it; old specs keep the old path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training.config import TrainConfig
from training.errors import ConfigError, DataError
from training.spec import ModelSpec
from training.transforms import SourceChain, to_model_input

RNG = np.random.default_rng(0)


def _spec(**fields) -> ModelSpec:
    base = ModelSpec("pneumoniamnist", "binary-class", ("normal", "pneumonia"), 64, 1)
    return base.with_fields(**fields)


def test_an_image_at_the_file_resolution_is_unchanged() -> None:
    images = RNG.integers(0, 255, (3, 28, 28), dtype=np.uint8)
    with_chain = _spec(source_crop="center", source_size=28).preprocess(images)
    np.testing.assert_array_equal(with_chain, _spec().preprocess(images))


def test_a_full_size_image_is_cropped_then_reduced_bicubic() -> None:
    image = RNG.integers(0, 255, (800, 1000), dtype=np.uint8)  # H 800, W 1000
    square = image[:, 100:900]
    reduced = np.asarray(Image.fromarray(square).resize((28, 28), Image.Resampling.BICUBIC))
    want = to_model_input(reduced[None], 64, 1)
    got = _spec(source_crop="center", source_size=28).preprocess(image[None])
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, _spec().preprocess(image[None]))  # the old path differs


def test_without_a_crop_the_whole_image_is_reduced() -> None:
    image = RNG.integers(0, 255, (450, 600, 3), dtype=np.uint8)
    out = SourceChain("none", 28).apply(image)
    assert out.shape == (28, 28, 3)
    # a crop alone (file-based data sets with --crop center): the square, not reduced
    assert SourceChain("center").apply(image).shape == (450, 450, 3)
    with pytest.raises(DataError, match="crop: expected one of"):
        SourceChain("middle", 28)


def test_specs_say_how_their_data_set_was_made() -> None:
    pneumonia = ModelSpec.for_dataset("pneumoniamnist", 64, size=28)
    assert (pneumonia.source_crop, pneumonia.source_size) == ("center", 28)
    breast = ModelSpec.for_dataset("breastmnist", 64, size=64)
    assert (breast.source_crop, breast.source_size) == ("none", 64)
    assert ModelSpec.for_dataset("pneumoniamnist", 64, crop="none").source_crop == "none"
    old = ModelSpec.from_json(_spec().to_json().replace('"source_crop": "none", ', ""))
    assert old.source_chain is None  # versions before the chain: resized straight


def test_config_refuses_an_unknown_crop(tmp_path) -> None:
    with pytest.raises(ConfigError, match="crop"):
        TrainConfig(crop="middle", storage_path=str(tmp_path))
