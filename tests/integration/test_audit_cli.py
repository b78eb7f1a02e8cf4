"""``medimg audit`` end to end, training nothing: tiny DenseNets registered in a real MLflow
SQLite store, audited on (a) a ChestX-ray14 tree whose rows are REAL rows of the NIH label
file in ``../shared/data`` (real patients, ages, sexes, views and findings) paired with
generated images, and (b) a folder data set with a cohort CSV; plus the CSV errors.

The images are generated and the models untrained: n, patients, positives and prevalence
per cohort are real properties of the sampled metadata; AUROC, sensitivity, specificity,
ECE and the underdiagnosis rate only show that the numbers are computed and reported."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from serving.cli import main
from tests.fixtures.data import CXR14_CSV, write_cxr14, write_image_tree
from training import chestxray14
from training.model import ProbabilityHead, build_model
from training.registry import log_and_register
from training.spec import ModelSpec

pytestmark = pytest.mark.timeout(300)
PNG = b"\x89PNG\r\n\x1a\n"
CXR_SPEC = ModelSpec(
    dataset="chestxray14",
    task=chestxray14.TASK,
    class_names=chestxray14.FINDINGS,
    image_size=32,
    channels=1,
    thresholds=(0.5,) * len(chestxray14.FINDINGS),
)
FOLDER_SPEC = ModelSpec(
    dataset="folder",
    task="binary-class",
    class_names=("normal", "pneumonia"),
    image_size=32,
    channels=1,
    positive_class="pneumonia",
    thresholds=(0.5,),
)


def _register(uri: str, spec: ModelSpec, name: str) -> str:
    """Log and register an untrained model in a run; returns the run id."""
    torch.manual_seed(0)
    model = ProbabilityHead(build_model(spec.channels, spec.num_classes), spec.multi_label)
    with mlflow.start_run() as run:
        mlflow.log_params({"val_fraction": 0.1, "test_fraction": 0.2})
        log_and_register(model.eval(), spec, name)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient(uri).create_experiment(
        "audit", artifact_location=(root / "artifacts").as_uri()
    )
    mlflow.set_experiment(experiment_id=experiment)
    runs = {"cxr": _register(uri, CXR_SPEC, "cxr"), "folder": _register(uri, FOLDER_SPEC, "fold")}
    return {"uri": uri, **runs}


def _test_rows(n: int = 200) -> list[list[str]]:
    """Real rows of the label file whose patients fall in the TEST split (as
    training.chestxray14 splits the whole file), whole patients, about ``n`` rows."""
    entries = chestxray14.read_entries(CXR14_CSV.parent)
    codes = chestxray14.assign_splits(entries, CXR14_CSV.parent, 0.1, 0.2)
    patients = np.unique(entries.patients[codes == 2])
    rng = np.random.default_rng(0)
    chosen, count = set(), 0
    per_patient = dict(
        zip(*np.unique(entries.patients[codes == 2], return_counts=True), strict=True)
    )
    for p in rng.permutation(patients):
        if count >= n:
            break
        chosen.add(p)
        count += per_patient[p]
    with gzip.open(CXR14_CSV, "rt", newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        return [r for r in reader if r[3] in chosen]


def _audit(*argv: str, capsys) -> tuple[int, str, str]:
    code = main(["audit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.skipif(
    not CXR14_CSV.exists(), reason=f"no real ChestX-ray14 label file at {CXR14_CSV}"
)
def test_chestxray14_real_metadata_generated_images(store, tmp_path: Path, capsys) -> None:
    rows = _test_rows()
    root = write_cxr14(tmp_path / "cxr14", rows)
    out = tmp_path / "out"
    code, text, err = _audit(
        "--model", "cxr/1", "--data-dir", str(root), "--tracking-uri", store["uri"],
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--n-boot", "200",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert "Underdiagnosis rate" in text and "age_band × view" in text
    data = json.loads((out / "audit.json").read_text())
    by = {(r["attribute"], r["value"]): r for r in data["rows"]}
    # n, patients and positives per cohort: the real metadata of the sampled rows
    assert by["all", "all"]["n"] == len(rows)
    assert by["all", "all"]["patients"] == len({r[3] for r in rows})
    for sex in ("M", "F"):
        mine = [r for r in rows if r[5] == sex]
        assert by["sex", sex]["n"] == len(mine)
        assert by["sex", sex]["positives"] == sum(r[1] != "No Finding" for r in mine)
    views = {r[6] for r in rows}
    assert {v for a, v in by if a == "view"} == views
    assert sum(r["n"] for (a, _), r in by.items() if a == "age_band") == len(rows)
    refs = [r for r in data["rows"] if r["attribute"] == "sex" and r["reference"]]
    assert len(refs) == 1 and refs[0]["n"] == max(by["sex", s]["n"] for s in ("M", "F"))
    assert data["thresholds"] == [0.5] * 14 and "model spec" in data["threshold_source"]
    assert (out / "forest.png").read_bytes().startswith(PNG)
    assert "<table>" in (out / "audit.html").read_text()
    logged = mlflow.MlflowClient(store["uri"]).list_artifacts(store["cxr"], "audit/chestxray14")
    assert {Path(f.path).name for f in logged} == {
        "audit.md", "audit.html", "audit.json", "forest.png"
    }  # fmt: skip


@pytest.fixture
def folder_data(tmp_path: Path) -> tuple[Path, Path]:
    """train/val/test folders (40 test images per class) and a cohort CSV keyed by path
    relative to the data directory: site (3 values, one tiny), sex, one-valued scanner,
    two images per patient."""
    root = tmp_path / "folder"
    write_image_tree(root / "train", {"normal": 2, "pneumonia": 2})
    write_image_tree(root / "val", {"normal": 2, "pneumonia": 2})
    files = write_image_tree(root / "test", {"normal": 40, "pneumonia": 40})
    table = tmp_path / "cohorts.csv"
    with table.open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["path", "patient_id", "site", "sex", "scanner"])
        for i, f in enumerate(sorted(p for ps in files.values() for p in ps)):
            site = "C" if i % 20 == 0 else "A" if i % 2 else "B"
            w.writerow([f.relative_to(root).as_posix(), f"p{i // 2}", site, "FM"[i % 3 == 0], "X1"])
    return root, table


def test_folder_with_cohort_csv(store, folder_data, tmp_path: Path, capsys) -> None:
    root, table = folder_data
    out = tmp_path / "out"
    code, text, err = _audit(
        "--model", "fold/1", "--data-dir", str(root), "--cohorts", str(table),
        "--by", "site,sex,scanner", "--tracking-uri", store["uri"], "--out", str(out),
        "--cache-dir", str(tmp_path / "cache"), "--n-boot", "200", "--no-mlflow",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    data = json.loads((out / "audit.json").read_text())
    by = {(r["attribute"], r["value"]): r for r in data["rows"]}
    assert by["all", "all"]["n"] == 80 and by["all", "all"]["patients"] == 40
    assert by["site", "C"]["n"] == 4 and by["site", "C"]["censored"]
    assert by["scanner", "X1"]["bands"]["auroc"] == "n/a (one class)"
    assert ("site × sex", "A × M") in by and ("sex × scanner", "F × X1") in by
    assert "underdiagnosis" not in data["metrics"]
    assert "n/a (one class)" in text and "censored" in text
    assert not mlflow.MlflowClient(store["uri"]).list_artifacts(store["folder"], "audit")


def test_csv_missing_a_file_names_it(store, folder_data, tmp_path: Path, capsys) -> None:
    root, table = folder_data
    lines = table.read_text().splitlines()
    dropped = next(line for line in lines if "pneumonia_007" in line)
    table.write_text("\n".join(line for line in lines if line != dropped) + "\n")
    code, _, err = _audit(
        "--model", "fold/1", "--data-dir", str(root), "--cohorts", str(table),
        "--tracking-uri", store["uri"], "--out", str(tmp_path / "out"), "--no-mlflow",
        capsys=capsys,
    )  # fmt: skip
    assert code == 1
    assert "test/pneumonia/pneumonia_007.png" in err and "no row for 1" in err, err


def test_csv_missing_a_column_names_it(store, folder_data, tmp_path: Path, capsys) -> None:
    root, table = folder_data
    common = ["--model", "fold/1", "--data-dir", str(root), "--tracking-uri", store["uri"]]
    common += ["--out", str(tmp_path / "out"), "--no-mlflow"]
    code, _, err = _audit(*common, "--cohorts", str(table), "--by", "site,race", capsys=capsys)
    assert code == 1 and "race" in err and "site" in err, err
    keyless = tmp_path / "keyless.csv"
    keyless.write_text("file,site\ntest/normal/normal_000.png,A\n")
    code, _, err = _audit(*common, "--cohorts", str(keyless), capsys=capsys)
    assert code == 1 and "missing column 'path'" in err and str(keyless) in err, err
    code, _, err = _audit(*common, capsys=capsys)
    assert code == 1 and "--cohorts" in err, err
