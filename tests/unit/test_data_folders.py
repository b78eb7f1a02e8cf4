"""Data sets beyond one MedMNIST npz: every 2D flag and size, class-per-folder trees, NIH
ChestX-ray14 (real label rows when ../shared/data is there), the decoded-image cache."""

from __future__ import annotations

import csv
import gzip
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.fixtures import data as data_fixtures
from tests.fixtures.data import cxr14_rows, write_cxr14, write_image_tree, write_medmnist_like
from training.chestxray14 import FINDINGS
from training.data import (
    DataOptions,
    check_data,
    dataset_info,
    known_datasets,
    medmnist_arrays,
    open_split,
)
from training.errors import DataError
from training.images import read_image
from training.transforms import resize_image, to_model_input

FLAGS = [
    *("pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist"),
    *("breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist"),
]
COUNTS = {"train": 12, "val": 6, "test": 6}


def opts(name: str, data_dir: Path, tmp_path: Path, **kw) -> DataOptions:
    return DataOptions(name, str(data_dir), cache_dir=str(tmp_path / "cache"), **kw)


def test_every_2d_medmnist_flag_and_the_file_sets_are_known() -> None:
    import medmnist

    assert sorted(known_datasets()) == sorted([*FLAGS, "folder", "chestxray14"])
    for flag in FLAGS:
        info, raw = dataset_info(flag), medmnist.INFO[flag]
        assert (info.task, info.channels) == (raw["task"], raw["n_channels"])
        assert info.class_names == tuple(raw["label"][str(i)] for i in range(len(raw["label"])))
    chest = dataset_info("chestmnist")
    assert chest.task == "multi-label, binary-class" and len(chest.class_names) == 14
    assert dataset_info("retinamnist").task == "ordinal-regression"  # scored as multi-class
    cxr = dataset_info("chestxray14")
    assert cxr.class_names[:3] == ("Atelectasis", "Cardiomegaly", "Effusion") and cxr.channels == 1


def test_options_from_config(tmp_path: Path) -> None:
    from training.config import TrainConfig

    cfg = TrainConfig(
        dataset="folder", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), seed=7
    )
    o = DataOptions.from_config(cfg)
    assert (o.dataset, o.data_dir, o.cache_dir, o.seed) == (
        "folder",
        cfg.data_dir,
        cfg.cache_dir,
        7,
    )
    assert (o.size, o.val_fraction, o.test_fraction) == (28, 0.1, 0.2)


def test_multilabel_rgb_and_size_64_npz_files(tmp_path: Path) -> None:
    write_medmnist_like(tmp_path / "chestmnist.npz", "chestmnist", COUNTS)
    write_medmnist_like(tmp_path / "bloodmnist_64.npz", "bloodmnist", COUNTS, size=64)
    write_medmnist_like(tmp_path / "pneumoniamnist_128.npz", "pneumoniamnist", COUNTS, size=128)
    for name, size in (("chestmnist", 28), ("bloodmnist", 64), ("pneumoniamnist", 128)):
        check_data(opts(name, tmp_path, tmp_path, size=size))
    chest = open_split(opts("chestmnist", tmp_path, tmp_path), "val", image_size=32, channels=1)
    raw = np.load(tmp_path / "chestmnist.npz")
    assert chest.images.shape == (6, 1, 32, 32) and chest.labels.shape == (6, 14)
    np.testing.assert_array_equal(chest.labels, raw["val_labels"])
    blood = open_split(
        opts("bloodmnist", tmp_path, tmp_path, size=64), "test", image_size=64, channels=3
    )
    raw = np.load(tmp_path / "bloodmnist_64.npz")["test_images"]
    np.testing.assert_array_equal(blood.images, raw.transpose(0, 3, 1, 2))  # no resize at 64
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    np.testing.assert_array_equal(
        blood.model_input(mean, std), to_model_input(raw, 64, 3, mean=mean, std=std)
    )
    images, labels = medmnist_arrays("pneumoniamnist", "train", tmp_path, size=128)
    assert images.shape == (12, 128, 128) and labels.shape == (12, 1)


def test_npz_errors_name_file_and_expected(tmp_path: Path) -> None:
    write_medmnist_like(tmp_path / "pathmnist_64.npz", "pathmnist", COUNTS, size=28)
    with pytest.raises(DataError, match=r"pathmnist_64\.npz.*\(N, 64, 64, 3\).*\(12, 28, 28, 3\)"):
        check_data(opts("pathmnist", tmp_path, tmp_path, size=64))
    write_medmnist_like(tmp_path / "pathmnist.npz", "pathmnist", {"train": 4, "test": 2})
    with pytest.raises(DataError, match=r"pathmnist\.npz: no array 'val_images'; found .*"):
        check_data(opts("pathmnist", tmp_path, tmp_path))
    np.savez(
        tmp_path / "chestmnist.npz",
        **{f"{s}_images": np.zeros((2, 28, 28), np.uint8) for s in COUNTS},
        **{f"{s}_labels": np.zeros((2, 1), np.uint8) for s in COUNTS},
    )
    with pytest.raises(DataError, match=r"train_labels must be \(2, 14\).*got \(2, 1\)"):
        medmnist_arrays("chestmnist", "train", tmp_path)


def test_image_split_items_batches_and_subsample(tmp_path: Path) -> None:
    write_medmnist_like(tmp_path / "bloodmnist.npz", "bloodmnist", {**COUNTS, "train": 64})
    o = opts("bloodmnist", tmp_path, tmp_path, seed=3)
    split = open_split(o, "train", image_size=32, channels=3, max_samples=24)
    again = open_split(o, "train", image_size=32, channels=3, max_samples=24)
    assert len(split) == 24 and set(split.labels[:, 0]) == set(range(8))  # every class kept
    np.testing.assert_array_equal(split.images, again.images)
    x, y = split[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y.dtype == torch.int64
    xb, yb = next(iter(DataLoader(split, batch_size=5)))
    assert xb.shape == (5, 3, 32, 32) and yb.shape == (5, 1)
    own = open_split(o, "train", image_size=32, max_samples=24)  # the data set's 3 channels
    np.testing.assert_array_equal(
        own.model_input((0.5,), (0.5,)), split.model_input((0.5,), (0.5,))
    )


def test_folder_is_split_stratified_and_fixed(tmp_path: Path) -> None:
    files = write_image_tree(tmp_path / "tree", {"CXR": 20, "AbdomenCT": 15, "Hand": 10})
    info = dataset_info("folder", tmp_path / "tree")
    assert info.class_names == ("AbdomenCT", "CXR", "Hand") and info.task == "multi-class"
    assert info.channels == 1
    o = opts("folder", tmp_path / "tree", tmp_path)
    check_data(o)
    splits = {s: open_split(o, s, image_size=32, channels=1) for s in ("train", "val", "test")}
    paths = {s: set(split.paths) for s, split in splits.items()}
    assert not (
        paths["train"] & paths["val"]
        or paths["train"] & paths["test"]
        or paths["val"] & paths["test"]
    )
    assert set().union(*paths.values()) == {str(p) for f in files.values() for p in f}
    assert (len(paths["test"]), len(paths["val"])) == (9, 5)  # 20% then 10% of 45
    for split in splits.values():
        assert set(split.labels[:, 0]) == {0, 1, 2}  # stratified: every class everywhere
        for path, label in zip(split.paths, split.labels[:, 0], strict=True):
            assert Path(path).parent.name == info.class_names[label]
    first = splits["val"]
    np.testing.assert_array_equal(first.images[0], resize_image(read_image(first.paths[0]), 32, 1))
    assert open_split(o, "val", image_size=32, channels=1).paths == first.paths  # fixed seed


def test_folder_given_splits_rgb_and_class_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "given"
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        write_image_tree(root / split, {"benign": n, "malignant": n}, rgb=True, suffix=".jpg")
    info = dataset_info("folder", root)
    assert (info.task, info.channels, info.class_names) == (
        "binary-class",
        3,
        ("benign", "malignant"),
    )
    test = open_split(opts("folder", root, tmp_path), "test", image_size=32, channels=3)
    assert len(test) == 6 and all("/test/" in p for p in test.paths)
    assert test.images.shape == (6, 3, 32, 32)
    (root / "val" / "malignant").rename(root / "val" / "other")
    with pytest.raises(DataError, match=r"val: class folders must match.*missing \['malignant'\]"):
        check_data(opts("folder", root, tmp_path))


def test_folder_of_dicom_files_and_bad_trees(tmp_path: Path) -> None:
    write_image_tree(tmp_path / "dcm", {"a": 10, "b": 10}, suffix=".dcm")
    o = opts("folder", tmp_path / "dcm", tmp_path)
    train = open_split(
        o, "train", image_size=32, channels=dataset_info("folder", o.data_dir).channels
    )
    assert train.images.shape == (14, 1, 32, 32) and train.paths[0].endswith(".dcm")
    write_image_tree(tmp_path / "one", {"only": 5})
    with pytest.raises(DataError, match=r"one: expected one sub-folder per class \(at least 2\)"):
        check_data(opts("folder", tmp_path / "one", tmp_path))
    (tmp_path / "one" / "empty").mkdir()
    with pytest.raises(DataError, match=r"\['empty'\] hold no image"):
        dataset_info("folder", tmp_path / "one")
    write_image_tree(tmp_path / "tiny", {"a": 1, "b": 6})
    with pytest.raises(DataError, match=r"cannot split 7 images stratified"):
        check_data(opts("folder", tmp_path / "tiny", tmp_path))


def test_undecodable_images_are_skipped_counted_and_cached(tmp_path: Path, caplog) -> None:
    root = tmp_path / "tree"
    write_image_tree(root, {"a": 10, "b": 10})
    for name in ("a/a_000.png", "a/a_001.png", "b/b_000.png"):
        (root / name).write_bytes(b"not an image")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    o = opts("folder", root, tmp_path)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        splits = [open_split(o, s, image_size=32, channels=1) for s in ("train", "val", "test")]
    assert sum(s.skipped for s in splits) == 3 and sum(len(s) for s in splits) == 17
    assert "a_000.png" in caplog.text and "could not be decoded" in caplog.text
    assert not any("_000.png" in p or "a_001.png" in p for s in splits for p in s.paths)
    cached = sorted((tmp_path / "cache").glob("images-*.npy"))
    assert len(cached) == 3 and sorted(p.relative_to(root) for p in root.rglob("*")) == before
    again = open_split(o, "train", image_size=32, channels=1)
    assert isinstance(again.images, np.memmap) and again.skipped == splits[0].skipped
    np.testing.assert_array_equal(again.images, splits[0].images)
    os.utime(root / "b" / "b_009.png", ns=(1, 1))  # a changed file is a new cache entry
    open_split(o, "train", image_size=32, channels=1)
    open_split(o, "val", image_size=32, channels=1)
    open_split(o, "test", image_size=32, channels=1)
    assert len(list((tmp_path / "cache").glob("images-*.npy"))) == 4


def _patients(rows: list[list[str]]) -> dict[str, str]:
    return {row[0]: row[3] for row in rows}


@pytest.fixture(params=["real label file", "generated label file"])
def cxr14(request, tmp_path: Path, monkeypatch) -> tuple[Path, list[list[str]]]:
    if request.param == "generated label file":
        monkeypatch.setattr(data_fixtures, "SHARED_DATA", tmp_path / "absent")
        monkeypatch.setattr(
            data_fixtures, "CXR14_CSV", tmp_path / "absent" / "Data_Entry_2017_v2020.csv.gz"
        )
    elif not data_fixtures.CXR14_CSV.exists():
        pytest.skip("../shared/data/chestxray14 is absent")
    rows = cxr14_rows()
    return write_cxr14(tmp_path / "cxr14", rows), rows


def test_chestxray14_is_split_by_patient(cxr14, tmp_path: Path, caplog) -> None:
    root, rows = cxr14
    next(root.glob(f"images_*/images/{rows[3][0]}")).write_bytes(b"\x89PNG broken")
    o = opts("chestxray14", root, tmp_path)
    with caplog.at_level(logging.WARNING):
        check_data(o)
        splits = {s: open_split(o, s, image_size=32, channels=1) for s in ("train", "val", "test")}
    assert sum(s.skipped for s in splits.values()) == 1
    names = {s: [Path(p).name for p in split.paths] for s, split in splits.items()}
    patient = _patients(rows)
    groups = {s: {patient[n] for n in names[s]} for s in names}
    assert all(groups.values())
    assert not (
        groups["train"] & groups["val"]
        or groups["train"] & groups["test"]
        or groups["val"] & groups["test"]
    )
    assert sorted(n for s in names.values() for n in s) == sorted(
        r[0] for r in rows if r[0] != rows[3][0]
    )
    for split in splits.values():  # labels: the 14 findings in the standard order
        for name, label in zip(split.paths, split.labels, strict=True):
            findings = next(r[1] for r in rows if r[0] == Path(name).name).split("|")
            assert [f for f, on in zip(FINDINGS, label, strict=True) if on] == sorted(
                (f for f in findings if f != "No Finding"), key=FINDINGS.index
            )
    if data_fixtures.CXR14_CSV.exists():  # the real rows: every other row of the file is absent
        assert caplog.text.count("111829 of 112120 rows") == 1
        where = {n: s for s in names for n in names[s]}
        nih = splits[where["00000001_000.png"]]
        i = [Path(p).name for p in nih.paths].index("00000001_000.png")
        assert nih.labels[i].tolist() == [0, 1] + [0] * 12  # Cardiomegaly
        assert nih.images[i].std() > 20  # the real radiograph, not a generated square


def test_chestxray14_official_lists(cxr14, tmp_path: Path) -> None:
    root, rows = cxr14
    patient = _patients(rows)
    test_patients = sorted({r[3] for r in rows})[::4]
    (root / "test_list.txt").write_text("\n".join(r[0] for r in rows if r[3] in test_patients))
    (root / "train_val_list.txt").write_text(
        "\n".join(r[0] for r in rows if r[3] not in test_patients)
    )
    o = opts("chestxray14", root, tmp_path)
    test = open_split(o, "test", image_size=32, channels=1)
    assert {patient[Path(p).name] for p in test.paths} == set(test_patients)
    train, val = (open_split(o, s, image_size=32, channels=1) for s in ("train", "val"))
    in_train = {patient[Path(p).name] for p in train.paths}
    in_val = {patient[Path(p).name] for p in val.paths}
    assert in_val and not in_train & in_val and not (in_train | in_val) & set(test_patients)


def test_chestxray14_bad_label_file_and_no_images(tmp_path: Path) -> None:
    root = tmp_path / "cxr"
    root.mkdir()
    (root / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Age\na.png,Mass,3\n")
    with pytest.raises(DataError) as err:
        check_data(opts("chestxray14", root, tmp_path))
    message = str(err.value)
    assert "Data_Entry_2017.csv" in message and "['Patient ID']" in message and "'Age'" in message
    (root / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Patient ID\na.png,Mass,3\n"
    )
    with pytest.raises(DataError, match=r"none of the 1 images of Data_Entry_2017\.csv found"):
        check_data(opts("chestxray14", root, tmp_path))
    with gzip.open(root / "Data_Entry_2017_v2020.csv.gz", "wt") as handle:
        csv.writer(handle).writerows(
            [["Image Index", "Finding Labels", "Patient ID"], ["b.png", "Masss", "4"]]
        )
    (root / "Data_Entry_2017.csv").unlink()
    with pytest.raises(DataError, match=r"line 2 \(b\.png\): unknown finding 'Masss'"):
        check_data(opts("chestxray14", root, tmp_path))


def test_image_cache_is_shared_atomic_and_optional(tmp_path: Path, caplog) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from training.images import read_images

    files = [str(p) for f in write_image_tree(tmp_path / "t", {"a": 8, "b": 8}).values() for p in f]
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(2) as pool:  # two "workers" at once: one decodes, one waits
        a, b = pool.map(lambda _: read_images(files, 32, 3, cache_dir=cache), range(2))
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape == (16, 3, 32, 32) and isinstance(b.images, np.memmap)
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".lock", ".npy"]  # no tmp left
    (tmp_path / "not_a_dir").write_text("")
    with caplog.at_level(logging.WARNING, logger="training.images"):
        fallback = read_images(files, 32, 3, cache_dir=tmp_path / "not_a_dir" / "cache")
    assert "not usable" in caplog.text
    np.testing.assert_array_equal(fallback.images, a.images)
