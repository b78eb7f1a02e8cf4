"""``medimg tune`` against real Ray Tune/Train, a real MLflow SQLite store and real data:
search-space validation, a job interrupted with SIGINT and resumed without re-running its
finished trial, MLflow parent/child runs, the best trial registered, ASHA stopping (slow)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from training.config import TrainConfig
from training.errors import ConfigError
from training.search_space import DEFAULT_SPACE, TUNABLE, load_space, parse_space

pytestmark = pytest.mark.timeout(600)
TINY = ["--dataset", "pneumoniamnist", "--image-size", "32", "--max-train-samples", "64"]
SPACE = "lr:\n  type: loguniform\n  lower: 1e-4\n  upper: 1e-2\nbatch_size:\n  type: choice\n  values: [16, 32]\n"
ROOT = Path(__file__).resolve().parents[2]


def _runs(uri: str, experiment: str) -> tuple[list, list]:
    """(parent runs, child runs) of ``experiment``."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return [r for r in runs if r not in children], children


def test_search_space_validation(tmp_path: Path) -> None:
    base = TrainConfig(data_dir=str(tmp_path))
    space = parse_space(DEFAULT_SPACE, base)
    assert set(space) == {
        "lr",
        "weight_decay",
        "batch_size",
        "optimizer",
        "aug_strength",
        "image_size",
    }
    example = parse_space(load_space(ROOT / "examples" / "search_space.yaml"), base)
    assert example["optimizer"].values == ("adam", "adamw", "sgd")
    (tmp_path / "s.yaml").write_text(SPACE)  # YAML reads 1e-4 as a string: coerced
    assert parse_space(load_space(tmp_path / "s.yaml"), base)["lr"].lower == 1e-4
    (tmp_path / "s.json").write_text(
        json.dumps({"seed": {"type": "randint", "lower": 0, "upper": 3}})
    )
    seed = parse_space(load_space(tmp_path / "s.json"), base)["seed"].to_tune()
    assert seed.lower == 0 and seed.upper == 4  # both ends included
    cases = [  # (space, what the error must name)
        (
            {"learning_rate": {"type": "uniform", "lower": 0.1, "upper": 1}},
            ["'learning_rate'", "lr", "weight_decay"],
        ),
        ({"epochs": {"type": "randint", "lower": 1, "upper": 3}}, ["'epochs'", "--epochs"]),
        ({"lr": {"type": "normal", "mean": 0}}, ["lr", "loguniform"]),
        ({"lr": {"type": "uniform", "lower": 0.1}}, ["lr", "upper"]),
        ({"lr": {"type": "uniform", "lower": 0.1, "upper": 0.01}}, ["lr", "below"]),
        ({"lr": {"type": "loguniform", "lower": 0, "upper": 1}}, ["lr", "> 0"]),
        ({"image_size": {"type": "choice", "values": [16, 64]}}, ["image_size", "16", ">= 32"]),
        ({"optimizer": {"type": "choice", "values": ["adam", "lion"]}}, ["optimizer", "lion"]),
        ({"batch_size": {"type": "uniform", "lower": 8, "upper": 64}}, ["batch_size", "choice"]),
        ({"batch_size": {"type": "choice", "values": [16, "big"]}}, ["batch_size", "'big'", "int"]),
    ]
    for raw, named in cases:
        with pytest.raises(ConfigError) as err:
            parse_space(raw, base)
        for text in named:
            assert text in str(err.value), (raw, str(err.value))
    assert "mlflow_run_id" not in TUNABLE and "lr" in TUNABLE
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_space(tmp_path / "bad.yaml")


def test_unknown_space_key_fails_parent_run(medimg_cmd, cli_env, tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(
        "lr:\n  type: loguniform\n  lower: 1e-4\n  upper: 1e-2\n"
        "learning_rate_decay:\n  type: uniform\n  lower: 0.1\n  upper: 0.9\n"
    )
    args = [*medimg_cmd, "tune", *TINY, "--space", str(tmp_path / "space.yaml")]
    args += ["--storage-path", str(tmp_path / "ray"), "--experiment", "bad-space"]
    result = subprocess.run(args, env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "unknown key 'learning_rate_decay'" in result.stderr and "weight_decay" in result.stderr
    assert "Traceback" not in result.stderr
    (parent,), children = _runs(cli_env["MLFLOW_TRACKING_URI"], "bad-space")
    assert parent.info.status == "FAILED" and not children
    assert "learning_rate_decay" in parent.data.tags["error"]


@pytest.mark.slow
def test_tune_interrupted_resumed_and_registered(
    medimg_cmd, cli_env, data_dir, tmp_path: Path
) -> None:
    """Two trials of 2 epochs, SIGINT while the second runs: the job stops with its state
    saved; ``--resume`` re-runs only the second. Parent + child runs with params and
    per-epoch metrics; the best trial by val AUC is registered from its child run."""
    uri = cli_env["MLFLOW_TRACKING_URI"]
    (tmp_path / "space.yaml").write_text(SPACE)
    args = [*medimg_cmd, "tune", *TINY, "--data-dir", str(data_dir), "--epochs", "2"]
    args += ["--samples", "2", "--search", "optuna", "--trial-scheduler", "none"]
    args += ["--experiment", "tune", "--space", str(tmp_path / "space.yaml")]
    args += ["--storage-path", str(tmp_path / "ray")]
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=cli_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while sorted(c.info.status for c in _runs(uri, "tune")[1]) != ["FINISHED", "RUNNING"]:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        interrupted_ms = time.time() * 1000
        proc.send_signal(signal.SIGINT)  # Tune saves its state and returns
        assert proc.wait(timeout=180) == 1, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    path = re.search(r"medimg tune --resume (\S+?)`", log.read_text()).group(1)
    (parent,), children = _runs(uri, "tune")
    first = next(c for c in children if c.info.status == "FINISHED")
    second = next(c for c in children if c is not first)
    assert parent.info.status == "KILLED" and second.info.status == "KILLED"
    assert second.data.tags["interrupted"] == "true"

    resumed = subprocess.run(
        [*medimg_cmd, "tune", "--resume", path],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-4000:]
    (parent,), children = _runs(uri, "tune")
    assert parent.info.status == "FINISHED" and "resumed_at" in parent.data.tags
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    client = MlflowClient(tracking_uri=uri)
    by_trial = {c.data.tags["ray_trial_id"]: c for c in children}
    again = by_trial[first.data.tags["ray_trial_id"]]  # finished before the interruption:
    assert "resumed_at" not in again.data.tags  # not re-run
    first_history = client.get_metric_history(again.info.run_id, "val_auc")
    assert max(m.timestamp for m in first_history) < interrupted_ms
    assert "resumed_at" in by_trial[second.data.tags["ray_trial_id"]].data.tags  # re-run
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["batch_size"] in ("16", "32")  # from the search space
        assert child.data.params["epochs"] == "2" and child.data.params["image_size"] == "32"
        history = client.get_metric_history(child.info.run_id, "val_auc")
        assert sorted(m.step for m in history) == [1, 2]  # per epoch, none twice
    assert len({c.data.params["lr"] for c in children}) == 2  # Optuna proposed each
    aucs = {
        c.info.run_id: max(m.value for m in client.get_metric_history(c.info.run_id, "val_auc"))
        for c in children
    }
    best_id = parent.data.tags["best_run_id"]
    assert aucs[best_id] == max(aucs.values())  # chosen by val AUC, never test
    assert parent.data.metrics["best_val_auc"] == pytest.approx(aucs[best_id])
    (version,) = client.search_model_versions("name = 'pneumoniamnist-densenet121'")
    assert version.run_id == best_id and parent.data.tags["registered"].endswith("/1")
    assert "test_auc" in client.get_run(best_id).data.metrics
    assert re.search(r"best trial \S+: val AUC", resumed.stdout), resumed.stdout
    assert resumed.stdout.count(" done") == 2, resumed.stdout


@pytest.mark.extended
def test_asha_stops_below_the_rung_cutoff(data_dir, tmp_path: Path) -> None:
    """Four sequential trials, ASHA (reduction 2): a trial stops after epoch 1 exactly when
    its val AUC is below the median of the earlier trials' epoch-1 AUCs."""
    import ray

    from training.tune import TuneSettings, run_tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "space.yaml").write_text(SPACE)
    cfg = TrainConfig(
        dataset="pneumoniamnist",
        data_dir=str(data_dir),
        image_size=32,
        max_train_samples=64,
        epochs=2,
        tracking_uri=uri,
        storage_path=str(tmp_path / "ray"),
        experiment="asha",
        seed=3,
    )
    settings = TuneSettings(samples=4, search="random", space_file=str(tmp_path / "space.yaml"))
    try:
        outcome = run_tune(cfg, settings)
    finally:
        ray.shutdown()
    client = MlflowClient(tracking_uri=uri)
    _, children = _runs(uri, "asha")
    children.sort(key=lambda c: c.info.start_time)
    first_epoch: list[float] = []
    stopped = 0
    for child in children:
        history = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "val_auc")}
        below = bool(first_epoch) and history[1] < np.nanpercentile(first_epoch, 50)
        first_epoch.append(history[1])
        if below:
            stopped += 1
            assert child.data.tags.get("stopped_early") == "true" and set(history) == {1}
            assert child.info.status == "KILLED" or child.info.run_id == outcome.best.run_id
        else:
            assert set(history) == {1, 2} and "stopped_early" not in child.data.tags
    assert stopped >= 1, first_epoch  # seed 3 draws a below-median trial
    assert sum(t.status == "stopped early" for t in outcome.trials) == stopped
