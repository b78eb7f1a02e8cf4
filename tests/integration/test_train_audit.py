"""The subgroup audit at training time: ``--cohorts`` audits the test split the run already
scored, logs it where ``medimg audit`` does, and the gate's ``max_subgroup_ratio`` reads it
(a real MLflow store, the real driver's finishing step on real weights; Ray is not needed
for it). A gate that needs an audit the data cannot give fails before training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from training.config import TrainConfig
from training.data import medmnist_arrays
from training.driver import finish_run, preflight
from training.errors import ConfigError, DataError
from training.gate import subgroup_ratios
from training.model import build_model
from training.ray_trainer import Best
from training.registry import ensure_experiment

pytestmark = pytest.mark.timeout(300)


def _cohort_csv(path: Path, n: int, *, drop: int | None = None) -> Path:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["index", "patient_id", "sex", "site"])
        for i in range(n):
            if i != drop:
                out.writerow([i, f"p{i // 2}", "F" if i % 3 else "M", f"s{i % 2}"])
    return path


def _config(tmp_path: Path, data_dir: Path, **fields) -> TrainConfig:
    return TrainConfig(
        dataset="pneumoniamnist",
        image_size=32,
        data_dir=str(data_dir),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        storage_path=str(tmp_path / "ray"),
        **fields,
    )


def test_cohorts_audit_the_test_split_and_the_gate_reads_it(tmp_path: Path, data_dir) -> None:
    n = len(medmnist_arrays("pneumoniamnist", "test", data_dir)[1])
    gate = tmp_path / "gate.yaml"
    gate.write_text("max_subgroup_ratio: 1.0\n")  # no cohort is exactly the reference's AUROC
    cfg = _config(
        tmp_path, data_dir, cohorts=str(_cohort_csv(tmp_path / "c.csv", n)), gate=str(gate)
    )
    spec = preflight(cfg)
    torch.manual_seed(0)
    weights = build_model(spec.channels, spec.num_classes).state_dict()
    best = Best(metrics={"val_auc": 0.5, "val_acc": 0.5, "epoch": 1}, state=weights)
    experiment = ensure_experiment(cfg.tracking_uri, cfg.experiment)
    with mlflow.start_run(experiment_id=experiment) as run:
        cfg.mlflow_run_id = run.info.run_id
        outcome = finish_run(cfg, best)

    client = MlflowClient(cfg.tracking_uri)
    logged = {
        Path(a.path).name for a in client.list_artifacts(run.info.run_id, "audit/pneumoniamnist")
    }
    assert logged == {"audit.md", "audit.html", "audit.json", "forest.png"}
    audit = json.loads(
        mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/audit/pneumoniamnist/audit.json")
    )
    assert audit["n_images"] == n and audit["n_patients"] == (n + 1) // 2
    assert {r["attribute"] for r in audit["rows"]} >= {"sex", "site", "sex × site"}
    ratios = dict(subgroup_ratios(audit))
    assert ratios, audit["rows"]
    worst_name, worst = max(ratios.items(), key=lambda kv: max(kv[1], 1 / kv[1]))
    # the gate decided on the audit the run logged, and did not move the champion alias
    assert "subgroup audit" in outcome.champion and "FAILED" in outcome.champion
    assert f"({worst_name}) outside" in outcome.champion
    decision = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/gate/decision.json"))
    assert decision["checks"][0]["value"] == pytest.approx(worst)
    assert client.get_run(run.info.run_id).data.tags["gate_decision"] == "failed"
    with pytest.raises(Exception, match="alias"):
        client.get_model_version_by_alias(outcome.model_name, "champion")


def test_subgroup_gate_without_cohorts_fails_before_training(tmp_path: Path, data_dir) -> None:
    gate = tmp_path / "gate.yaml"
    gate.write_text("max_subgroup_ratio: 1.25\n")
    with pytest.raises(ConfigError, match=r"pneumoniamnist has no cohort metadata.*--cohorts"):
        preflight(_config(tmp_path, data_dir, gate=str(gate)))


def test_a_cohort_csv_missing_a_test_row_fails_before_training(tmp_path: Path, data_dir) -> None:
    n = len(medmnist_arrays("pneumoniamnist", "test", data_dir)[1])
    csv_path = _cohort_csv(tmp_path / "c.csv", n, drop=7)
    with pytest.raises(DataError, match=r"c\.csv: no row for 1 of the .* test rows: 7"):
        preflight(_config(tmp_path, data_dir, cohorts=str(csv_path)))
