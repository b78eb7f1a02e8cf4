"""``medimg export`` errors and ``medimg pipeline --keep-serving`` as a user runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.pipeline import wait_for_output

pytestmark = pytest.mark.timeout(900)


def test_export_bad_model_names_it(trained, medimg_cmd, cli_env, tmp_path: Path) -> None:
    cfg, _ = trained
    env = {**cli_env, "MLFLOW_TRACKING_URI": cfg.tracking_uri}
    for ref in ("nosuchmodel/3", "pneumoniamnist-densenet121/99"):
        result = subprocess.run(
            [*medimg_cmd, "export", "--model", ref, "--repository", str(tmp_path / "repo")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0 and ref.split("/")[0] in result.stderr
    missing_run = subprocess.run(
        [*medimg_cmd, "export", "--run-id", "0" * 32],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing_run.returncode != 0 and "0" * 32 in missing_run.stderr
    assert not (tmp_path / "repo").exists()  # nothing half-written


@pytest.mark.slow  # ~3 min: a whole pipeline; README quickstart 1 runs the same command
def test_pipeline_keep_serving(medimg_cmd, cli_env, tmp_path: Path, free_port, data_dir) -> None:
    ports = [free_port(), free_port(), free_port()]
    log = tmp_path / "pipeline.log"
    args = [
        *medimg_cmd,
        "pipeline",
        "--dataset",
        "pneumoniamnist",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--max-train-samples",
        "128",
        # relative paths, as a user types them: Ray workers run elsewhere and must still find them
        "--data-dir",
        os.path.relpath(data_dir, tmp_path),
        "--tracking-uri",
        "sqlite:///runs/mlflow.db",
        "--repository",
        "repo",
        "--keep-serving",
        "--http-port",
        str(ports[0]),
        "--grpc-port",
        str(ports[1]),
        "--metrics-port",
        str(ports[2]),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            args, cwd=tmp_path, env=cli_env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        text = wait_for_output(log, "Ctrl-C stops", proc, timeout=600)
        here = re.search(r"in-process:\s+AUC ([\d.]+)\s+ACC ([\d.]+)", text)
        there = re.search(r"through Triton: AUC ([\d.]+)\s+ACC ([\d.]+)", text)
        assert here and there, text[-4000:]
        assert (
            abs(float(here[1]) - float(there[1])) <= 1e-3
            and abs(float(here[2]) - float(there[2])) <= 1e-3
        )
        # still serving: classify a file over HTTP while the pipeline keeps the server up
        npy = data_dir / "pneumoniamnist.npz"
        import numpy as np

        image = np.load(npy)["test_images"][0]
        np.save(tmp_path / "x.npy", image)
        result = subprocess.run(
            [
                *medimg_cmd,
                "classify",
                str(tmp_path / "x.npy"),
                "--json",
                "--url",
                f"127.0.0.1:{ports[0]}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["label"] in ("normal", "pneumonia")
        # MLflow has the Triton-measured metrics beside the in-process ones
        from mlflow import MlflowClient

        run_id = re.search(r"MLflow run ([0-9a-f]{32})", text)[1]
        metrics = (
            MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
            .get_run(run_id)
            .data.metrics
        )
        assert metrics["triton_test_auc"] == pytest.approx(metrics["test_auc"], abs=1e-3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_served_test_split_agrees_with_in_process(
    exported, trained, tmp_path_factory, triton_cache_dir
) -> None:
    """What the pipeline checks after training, on the session's trained and exported
    model: the test split sent as a client sends it (MedMNIST images at the file's
    resolution, PNG) gives the in-process calibrated probabilities to 1e-4, through the
    server-side preprocessing (which reduces larger inputs as the data set was made)."""
    from contextlib import contextmanager

    from serving.pipeline import check_agreement, evaluate_served
    from tests.fixtures.triton import running_server

    cfg, outcome = trained
    _, repository, _ = exported
    log = tmp_path_factory.mktemp("pipeline_served") / "server.log"
    with contextmanager(running_server)(repository, log) as server:
        served = evaluate_served(server, outcome, cfg)
    assert served.images == len(outcome.test_labels)
    check_agreement(outcome, served)  # raises past 1e-4 per probability, 1e-3 AUC/ACC
    assert served.acc_at_threshold is not None
