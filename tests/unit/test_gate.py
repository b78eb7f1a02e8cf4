"""The promotion gate: loading a gate file (errors name the file and the key), each
criterion against a run's numbers, missing evidence failing, and the decision logged to
a real MLflow store."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from training.errors import ConfigError
from training.gate import Gate, log_decision, run_evidence


def _write(tmp_path, text: str, name: str = "gate.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_and_check(tmp_path):
    gate = Gate.load(_write(tmp_path, "min_auc_ci_low: 0.9\nmax_ece: 0.05\n"))
    ok = gate.check({"test_auc_ci_low": 0.93, "test_ece_after": 0.02})
    assert ok.passed and len(ok.checks) == 2 and "PASSED" in ok.message
    bad = gate.check({"test_auc_ci_low": 0.88, "test_ece_after": 0.02})
    assert not bad.passed
    assert "FAIL test AUROC 95% CI lower bound 0.8800 (required >= 0.9)" in bad.message


def test_missing_evidence_fails(tmp_path):
    gate = Gate.load(_write(tmp_path, "max_ece: 0.05\nmax_subgroup_ratio: 1.25\n"))
    decision = gate.check({})
    assert not decision.passed
    assert "not found in the run" in decision.message and "medimg audit" in decision.message


def _audited(shift: float) -> dict:
    """A real audit (training.audit) of scores whose separation in cohort F is ``shift``
    times cohort M's, in the JSON form ``medimg audit`` writes."""
    from training.audit import audit

    rng = np.random.default_rng(0)
    n = 2000
    sex = rng.choice(["M", "F"], n, p=[0.6, 0.4])
    y = (rng.random(n) < 0.4).astype(int)
    signal = np.where(sex == "M", 2.0, 2.0 * shift)
    score = 1 / (1 + np.exp(-(signal * (y - 0.5) + rng.normal(0, 1, n))))
    result = audit("binary-class", y[:, None], np.c_[1 - score, score], {"sex": sex}, n_boot=50)
    return json.loads(json.dumps(result.to_dict()))


def test_subgroup_ratio_of_a_real_audit():
    gate = Gate(max_subgroup_ratio=1.25)
    fair = gate.check({}, _audited(1.0))
    assert fair.passed, fair.message
    assert fair.checks[0].value is not None and 0.8 <= fair.checks[0].value <= 1.25
    unfair = gate.check({}, _audited(0.1))  # F's scores barely separate: AUROC near 0.5
    assert not unfair.passed, unfair.message
    assert "(sex=F) outside" in unfair.message and unfair.checks[0].value < 0.8


def test_censored_cohorts_are_not_evidence():
    audit = _audited(0.1)
    for row in audit["rows"]:
        if row["value"] == "F":
            row["censored"] = True
    decision = Gate(max_subgroup_ratio=1.25).check({}, audit)
    # the only cohort compared with the reference is censored: no evidence, no pass
    assert not decision.passed and "no subgroup audit with an uncensored cohort" in decision.message
    assert "sex=F" not in decision.message


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("max_ec: 0.1\n", r"unknown key\(s\) \['max_ec'\]"),
        ("max_ece: high\n", "max_ece expected a number"),
        ("max_ece: 2\n", r"max_ece expected in \[0, 1\]"),
        ("[1, 2\n", "not valid YAML"),
        ("- 1\n", "expected a mapping"),
    ],
)
def test_bad_gate_files_name_the_problem(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        Gate.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        Gate.load(tmp_path / "absent.yaml")


def test_decision_is_logged_and_evidence_read_back(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = MlflowClient(uri).create_experiment(
        "g", artifact_location=(tmp_path / "a").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_metrics({"test_auc_ci_low": 0.95, "test_ece_after": 0.2})
        mlflow.log_dict(_audited(1.0), "audit/chestxray14/audit.json")
    metrics, audit = run_evidence(uri, run.info.run_id)
    decision = Gate(min_auc_ci_low=0.9, max_ece=0.1, max_subgroup_ratio=1.25).check(metrics, audit)
    assert [c.passed for c in decision.checks] == [True, False, True]
    log_decision(decision, run.info.run_id, uri)
    logged = MlflowClient(uri).get_run(run.info.run_id)
    assert logged.data.tags["gate_decision"] == "failed"
    assert logged.data.metrics["gate_max_ece_value"] == pytest.approx(0.2)
    saved = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/gate/decision.json"))
    assert saved["passed"] is False and len(saved["checks"]) == 3
