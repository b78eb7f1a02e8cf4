"""``medimg card`` on a really trained version: every number comes from its MLflow run
and data files, the three files are written and attached to the version."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.timeout(300)


def test_card_from_the_run(trained, medimg_cmd, tmp_path: Path) -> None:
    cfg, outcome = trained
    out = tmp_path / "card"
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking_uri}
    ref = f"{outcome.model_name}/{outcome.version}"
    args = ["card", "--model", ref, "--out", str(out), "--examples", "0"]
    result = subprocess.run(
        [*medimg_cmd, *args], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {
        "model_card.md",
        "model_card.html",
        "model_card.json",
    }
    card = json.loads((out / "model_card.json").read_text())
    for section in (
        "BasicInfo",
        "ReleaseInfo",
        "UsesAndDirections",
        "Warnings",
        "TrustIngredients",
        "KeyMetrics",
    ):
        assert section in card, section
    assert "Not a medical device" in card["UsesAndDirections"]["IntendedUseAndWorkflow"]
    run = MlflowClient(tracking_uri=cfg.tracking_uri).get_run(outcome.run_id)
    auroc = card["KeyMetrics"]["UsefulnessUsabilityEfficacy"]["Results"][0]
    assert auroc["Label"] == "AUROC"
    assert auroc["ValueJson"]["estimate"] == pytest.approx(run.data.metrics["test_auc"])
    assert auroc["ValueJson"]["lower"] == pytest.approx(run.data.metrics["test_auc_ci_low"])
    ece_after = next(
        r for r in card["KeyMetrics"]["SafetyReliability"]["Results"] if r["Label"] == "ECE after"
    )
    assert ece_after["ValueJson"]["estimate"] == pytest.approx(run.data.metrics["test_ece_after"])
    npz = Path(cfg.data_dir) / "pneumoniamnist.npz"
    data = card["TrustIngredients"]["AISystemFacts"]["InputDataSource"]
    assert data["files"]["pneumoniamnist.npz"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert data["splits"]["test"]["n"] == len(outcome.test_labels)
    assert card["Medimg"]["temperature"] == list(outcome.spec.temperature)
    assert card["Medimg"]["gate"]["passed"] is True
    markdown = (out / "model_card.md").read_text()
    assert "## Calibration (test split)" in markdown and "pneumonia" in markdown
    assert "<h2>Limitations</h2>" in (out / "model_card.html").read_text()
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    attached = {Path(a.path).name for a in client.list_artifacts(outcome.run_id, "model_card")}
    assert attached == {"model_card.md", "model_card.html", "model_card.json"}
    tag = client.get_model_version(outcome.model_name, outcome.version).tags["model_card"]
    assert tag == f"runs:/{outcome.run_id}/model_card"


def test_card_of_an_unknown_model_fails(trained, medimg_cmd, tmp_path: Path) -> None:
    cfg, _ = trained
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking_uri}
    args = ["card", "--model", "no-such-model/1", "--out", str(tmp_path / "c")]
    result = subprocess.run(
        [*medimg_cmd, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "no-such-model" in result.stderr
    assert not (tmp_path / "c").exists()
