"""Ray Train on a real two-node local cluster: training spreads across both nodes, and a
training worker killed mid-run is restarted from the last checkpoint with no epoch lost
or repeated in the MLflow metrics. One run proves both (each costs Ray's start-up)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.timeout(600)


def _train_args(medimg_cmd, cluster, tmp_path: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        *medimg_cmd,
        "train",
        "--ray-address",
        cluster.address,
        "--data-dir",
        str(data_dir),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--storage-path",
        str(tmp_path / "ray_results"),
        "--image-size",
        "32",
        "--batch-size",
        "32",
        *extra,
    ]


def _only_run(uri: str):
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medimg").experiment_id])
    return client, run


@pytest.mark.slow
def test_training_spans_two_nodes_and_survives_a_killed_worker(
    ray_cluster, medimg_cmd, cli_env, data_dir, tmp_path
) -> None:
    """Two workers, one per node (each node has 1 CPU, each worker asks for 1). After the
    first epoch a training worker is SIGKILLed: the worker group restarts from the last
    checkpoint and the run finishes with every epoch in MLflow exactly once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _train_args(
        medimg_cmd,
        ray_cluster,
        tmp_path,
        data_dir,
        "--workers",
        "2",
        "--cpus-per-worker",
        "1",
        "--epochs",
        "3",
        "--max-train-samples",
        "384",
        "--max-failures",
        "2",
    )
    log = tmp_path / "train.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=cli_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        client = MlflowClient(tracking_uri=uri)
        deadline = time.monotonic() + 300
        victims: list[int] = []
        while not victims:  # the first epoch is checkpointed and logged: kill the worker
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            runs = (
                client.search_runs([client.get_experiment_by_name("medimg").experiment_id])
                if client.get_experiment_by_name("medimg")
                else []
            )
            if runs and client.get_metric_history(runs[0].info.run_id, "val_auc"):
                victims = ray_cluster.processes_titled("ray::RayTrainWorker")
            time.sleep(0.5)
        os.kill(victims[0], signal.SIGKILL)
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert "resumed from" in output, output[-4000:]
    client, run = _only_run(uri)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")]
    assert sorted(steps) == [1, 2, 3], steps  # none lost, none twice
    nodes = run.data.tags["ray_worker_nodes"].split(",")
    assert len(nodes) == 2 and len({n.split("/")[1] for n in nodes}) == 2, nodes
    assert run.data.params["workers"] == "2"
    assert victims[0] not in ray_cluster.processes_titled("ray::RayTrainWorker")


@pytest.mark.slow
def test_local_train_beside_another_ray_instance(
    ray_cluster, medimg_cmd, cli_env, data_dir, tmp_path
) -> None:
    """With another Ray instance on this machine (the module's cluster), `medimg train`
    without --ray-address starts its own and tells its workers where its State API is:
    Train V2's PlacementGroupCleaner would otherwise fail to auto-detect it ("Found
    multiple active Ray instances") and leave the run's placement group behind."""
    env = {k: v for k, v in cli_env.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    args = _train_args(medimg_cmd, ray_cluster, tmp_path, data_dir, "--epochs", "1")
    i = args.index("--ray-address")
    del args[i : i + 2]
    args += ["--max-train-samples", "128", "--workers", "1"]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=500)
    output = result.stdout + result.stderr
    output += "".join(p.read_text() for p in (tmp_path / "ray_results").glob("*/medimg.log"))
    assert result.returncode == 0, output[-4000:]
    assert "multiple active Ray instances" not in output, output[-4000:]
    _, run = _only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "FINISHED"
