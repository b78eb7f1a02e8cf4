"""A real Ray Train run (2 workers) tracked in a real MLflow store; failures close the run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from tests.fixtures.pipeline import scratch_of, write_medmnist_npz
from training.config import TrainConfig
from training.driver import train_and_register
from training.errors import DataError
from training.metrics import evaluate

pytestmark = pytest.mark.timeout(600)


def test_train_reports_checkpoint_and_registers(trained, tmp_path: Path) -> None:
    cfg, outcome = trained
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("train_loss", "val_auc", "val_acc", "best_val_auc", "test_auc", "test_acc"):
        assert key in metrics, key
    # per-epoch metrics come from rank 0, one step per epoch
    assert [m.step for m in client.get_metric_history(outcome.run_id, "val_auc")] == [1]
    assert run.data.params["workers"] == "2" and run.data.params["max_train_samples"] == "256"
    assert metrics["test_auc"] == pytest.approx(outcome.test["auc"])
    # the test metrics are those of the probabilities the run produced
    assert evaluate(outcome.spec.task, outcome.test_labels, outcome.test_probs)[
        "auc"
    ] == pytest.approx(metrics["test_auc"])
    version = client.get_model_version(outcome.model_name, outcome.version)
    assert version.run_id == outcome.run_id and outcome.model_name == "pneumoniamnist-densenet121"
    # Ray kept the epoch's checkpoint on disk
    checkpoints = list(Path(cfg.storage_path).glob("*/checkpoint_*/model.pt"))
    assert len(checkpoints) == 1
    # ROC curve and confusion matrix of the test split, as PNG artifacts
    plots = {Path(a.path).name: a for a in client.list_artifacts(outcome.run_id, "plots")}
    assert set(plots) == {"roc_test.png", "confusion_test.png"}
    local = client.download_artifacts(outcome.run_id, "plots/roc_test.png", str(tmp_path))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outcome.test_probs.shape == (len(outcome.test_labels), 2)
    np.testing.assert_allclose(outcome.test_probs.sum(axis=1), 1.0, atol=1e-5)
    # nothing left in the temp dir (the best checkpoint's weights were once copied there)
    assert list(scratch_of(cfg.storage_path).iterdir()) == []


def test_ray_run_records_its_start_and_ends_promptly(trained) -> None:
    """The run logs Ray's start and end (``ray_timing``). Ray Train's controller polls its
    workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: at Ray's 2 s default a finished run
    waited 3.0-4.9 s before it ended (measured); medimg sets 0.25 s (0.4-1.5 s)."""
    cfg, outcome = trained
    metrics = MlflowClient(tracking_uri=cfg.tracking_uri).get_run(outcome.run_id).data.metrics
    assert 0 < metrics["ray_worker_start_s"] < 300
    assert 0 <= metrics["ray_run_end_s"] < 2.5, metrics["ray_run_end_s"]


def test_train_calibrates_and_records_the_trust_fields(trained, tmp_path: Path) -> None:
    """Temperature fitted on val, before/after on test logged with a reliability diagram,
    the served model returns the calibrated probabilities, the spec carries the finding,
    the temperature, the operating threshold and the review statistics; the gate decided."""
    from training.registry import load_model

    cfg, outcome = trained
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    run = client.get_run(outcome.run_id)
    for key in (
        "test_ece_before",
        "test_ece_after",
        "test_brier_after",
        "test_nll_after",
        "temperature",
    ):
        assert key in run.data.metrics, key
    names = {Path(a.path).name for a in client.list_artifacts(outcome.run_id, "calibration")}
    assert {"reliability.png", "calibration.json", "calibration.md"} <= names
    spec = outcome.spec
    assert spec.positive_class == "pneumonia" and spec.positive_index == 1
    assert len(spec.temperature) == 1 and spec.temperature[0] > 0
    assert run.data.metrics["temperature"] == pytest.approx(spec.temperature[0])
    assert spec.thresholds == tuple(outcome.thresholds) and len(spec.thresholds) == 1
    assert spec.review and spec.review.get("n", 0) > 0
    assert outcome.calibration["temperature"] == list(spec.temperature)
    loaded = load_model(cfg.tracking_uri, f"models:/{outcome.model_name}/{outcome.version}")
    assert loaded.spec == spec
    import torch

    from training.data import DataOptions, open_split

    test = open_split(DataOptions.from_config(cfg), "test", image_size=cfg.image_size, channels=1)
    with torch.no_grad():
        served = loaded.module(torch.from_numpy(test.model_input(spec.mean, spec.std))).numpy()
    np.testing.assert_allclose(served, outcome.test_probs, atol=1e-5)
    # the gate decided at training time (publish --gate may log a later decision on the run)
    assert "PASSED" in outcome.champion and "gate_decision" in run.data.tags
    assert (
        client.get_model_version_by_alias(outcome.model_name, "champion").version == outcome.version
    )


def test_cli_train_console(medimg_cmd, cli_env, data_dir, tmp_path: Path) -> None:
    """`medimg train` prints its progress (off a terminal: one line per epoch) and its
    results; Ray's report lines and the libraries' output go to medimg.log in the run
    directory, whose path it prints. With -v they reach the console too."""
    storage = ["--storage-path", str(tmp_path / "ray")]
    args = ["--data-dir", str(data_dir), "--epochs", "1", "--max-train-samples", "128"]
    result = subprocess.run(
        [*medimg_cmd, "train", *args, "--image-size", "32", *storage],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"^MLflow run: [0-9a-f]{32}$", result.stdout, re.M), result.stdout
    assert re.search(r"^test AUC [\d.]+  ACC [\d.]+$", result.stdout, re.M), result.stdout
    epoch = r"^epoch 1/1  loss [\d.]+  val AUC [\d.]+  \d+ img/s  \d+ s  ETA 0:00$"
    assert len(re.findall(epoch, result.stderr, re.M)) == 1, result.stderr
    path = Path(re.search(r"^log file: (.+)$", result.stderr, re.M)[1])
    assert path.name == "medimg.log" and path.parent.parent == tmp_path / "ray"
    console, logged = result.stdout + result.stderr, path.read_text()
    for text in (
        "Reporting training result 1",  # Ray Train V2, per worker per epoch
        "(TrainController pid=",
        "Started a local Ray instance",
        "Successfully registered model",  # MLflow's print
    ):
        assert text not in console and text in logged, (text, console[-3000:])
    assert "pickle" not in console + logged  # the model is logged as weights + spec

    verbose = subprocess.run(  # fails once Ray runs: no GPU in this cluster
        [*medimg_cmd, "-v", "train", *args, "--gpus-per-worker", "1", *storage],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert verbose.returncode != 0 and "the Ray cluster has 0" in verbose.stderr
    assert "Started a local Ray instance" in verbose.stderr, verbose.stderr[-3000:]


def test_bad_data_fails_the_mlflow_run(tmp_path: Path) -> None:
    write_medmnist_npz(
        tmp_path / "pneumoniamnist.npz", {"train": 8, "val": 4, "test": 4}, n_classes=5
    )
    one_class = tmp_path / "folder"
    for i in range(6):
        (one_class / "covid").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(one_class / "covid" / f"{i}.png")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cases = [  # (options, what the error names)
        ({"data_dir": str(tmp_path)}, "train_labels"),
        ({"dataset": "folder", "data_dir": str(one_class)}, "class"),
    ]
    for options, named in cases:
        cfg = TrainConfig(tracking_uri=uri, storage_path=str(tmp_path / "ray"), **options)
        with pytest.raises(DataError, match=named):
            train_and_register(cfg)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("medimg")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"]


def test_cli_train_bad_input(medimg_cmd, cli_env, tmp_path: Path) -> None:
    """Each bad option: non-zero exit and a message naming it. The cases run side by side
    (each is mostly interpreter start-up); GPUs asked of a CPU-only Ray cluster are in
    test_train_starts_its_own_ray_despite_a_stale_cluster_address."""
    cases = [  # (arguments, what the error must name)
        (["--dataset", "lungmnist"], ["lungmnist", "pneumoniamnist"]),
        (
            ["--data-dir", str(tmp_path / "nowhere")],
            [str(tmp_path / "nowhere" / "pneumoniamnist.npz")],
        ),
        (["--image-size", "16"], ["image_size"]),
        (["--augment", "hflip,zoom"], ["augment", "zoom"]),
        (["--recipe", "resnet"], ["recipe", "chexnet"]),
        (["--pretrained-weights", str(tmp_path / "none.pth")], [str(tmp_path / "none.pth")]),
        (["--resume", "not-a-run"], ["not-a-run", "checkpoint"]),
    ]
    procs = []
    for i, (args, _) in enumerate(cases):
        env = {**cli_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / f'mlflow{i}.db'}"}
        procs.append(
            subprocess.Popen(
                [*medimg_cmd, "train", *args],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc, (args, named) in zip(procs, cases, strict=True):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode != 0, args
        for text in named:
            assert text in stderr, (args, stderr[-2000:])


def test_train_starts_its_own_ray_despite_a_stale_cluster_address(
    medimg_cmd, cli_env, tmp_path: Path
) -> None:
    """A `ray start` cluster that ended without `ray stop` leaves its address in
    ``ray_current_cluster``; with no --ray-address, train starts a local instance instead
    of waiting on that dead address (Ray's own default for ``ray.init()``)."""
    import shutil
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="medimg-ray-"))  # short: Ray's sockets live here
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens
        env = {**cli_env, "RAY_TMPDIR": str(ray_tmp)}
        env.pop("RAY_ADDRESS", None)
        result = subprocess.run(
            [*medimg_cmd, "train", "--gpus-per-worker", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode != 0
    assert "the Ray cluster has 0" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_stopped_run_resumes_in_the_same_mlflow_run(
    medimg_cmd, cli_env, data_dir, tmp_path
) -> None:
    """Interrupt `medimg train` after its first epoch; `--resume RUN_ID` finishes the same
    MLflow run from the checkpoint: every epoch logged exactly once."""
    import signal
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--tracking-uri", uri, "--storage-path", str(tmp_path / "ray")]
    args = [
        *medimg_cmd,
        "train",
        "--data-dir",
        str(data_dir),
        "--epochs",
        "3",
        "--max-train-samples",
        "256",
        "--image-size",
        "32",
        *common,
    ]
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=cli_env, stdout=out, stderr=subprocess.STDOUT)
    client = MlflowClient(tracking_uri=uri)
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            experiment = client.get_experiment_by_name("medimg")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and client.get_metric_history(runs[0].info.run_id, "val_auc"):
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run_id = runs[0].info.run_id
    assert client.get_run(run_id).info.status != "FINISHED"
    done = [m.step for m in client.get_metric_history(run_id, "val_auc")]
    assert done and max(done) < 3, done

    result = subprocess.run(
        [*medimg_cmd, "train", "--resume", run_id, *common],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"MLflow run: {run_id}" in result.stdout
    assert "resumed from" in result.stderr, result.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_auc" in run.data.metrics
    steps = [m.step for m in client.get_metric_history(run_id, "val_auc")]
    assert sorted(steps) == [1, 2, 3], steps
