"""``medimg publish`` against a real embedded server in explicit model-control mode: a
client sends requests in a loop while the registry's model is published as version 2;
not one request fails across the switch, and version 2 is what serves afterwards::

    python -m pytest tests/integration/test_publish.py -q
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving.pipeline import png_bytes
from serving.server.process import TritonServer
from tests.fixtures.triton import free_ports

pytestmark = pytest.mark.timeout(600)


class Traffic(threading.Thread):
    """Single-image requests to the ensemble, back to back, until stopped."""

    def __init__(self, url: str, model: str, image: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.image = url, model, image
        self.ok, self.failed, self.errors = 0, 0, []
        self.stopping = threading.Event()

    def run(self) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while not self.stopping.is_set():
                inp = grpcclient.InferInput("image", [1, 1], "BYTES")
                inp.set_data_from_numpy(np.array([[self.image]], dtype=np.object_))
                try:
                    out = client.infer(self.model, [inp]).as_numpy("probabilities")
                    assert out.shape[0] == 1
                    self.ok += 1
                except Exception as exc:  # every failure counts, whatever its kind
                    self.failed += 1
                    self.errors.append(str(exc))
        finally:
            client.close()


@pytest.mark.slow  # an export of its own (~1 min) under traffic; the default suite stays < 10 min
def test_publish_switches_versions_with_zero_failed_requests(
    trained, exported, medimg_cmd, triton_cache_dir, tmp_path
):
    cfg, outcome = trained
    _, repository, _ = exported
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)  # version 1, as exported
    ports = free_ports()
    server = TritonServer(
        repo, model_control_mode="explicit", log_file=tmp_path / "server.log", **ports
    )
    from training.data import medmnist_arrays

    image = png_bytes(medmnist_arrays("pneumoniamnist", "test", cfg.data_dir)[0][:1])
    with server:
        traffic = Traffic(server.grpc_url, outcome.model_name, image)
        traffic.start()
        time.sleep(2)
        env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking_uri}
        result = subprocess.run(
            [
                *medimg_cmd,
                "publish",
                "--model",
                f"{outcome.model_name}/{outcome.version}",
                "--repository",
                str(repo),
                "--data-dir",
                cfg.data_dir,
                "--url",
                f"127.0.0.1:{ports['http_port']}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        time.sleep(2)
        traffic.stopping.set()
        traffic.join(timeout=60)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            classifier = f"{outcome.model_name}_onnx"
            assert client.is_model_ready(classifier, "2")
            assert not client.is_model_ready(classifier, "1")  # latest:1 retired it
        finally:
            client.close()
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"now serves {outcome.model_name}_onnx version(s) [2]" in result.stdout, result.stdout
    assert traffic.failed == 0, traffic.errors[:5]
    assert traffic.ok > 20, traffic.ok
    assert (repo / f"{outcome.model_name}_onnx" / "1" / "model.onnx").exists()  # v1 left alone
    assert (repo / f"{outcome.model_name}_preprocess" / "2" / "model.py").exists()


def test_publish_to_a_server_that_is_not_there(trained, medimg_cmd, tmp_path, free_port) -> None:
    cfg, outcome = trained
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking_uri}
    url = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [
            *medimg_cmd,
            "publish",
            "--model",
            f"{outcome.model_name}@champion",
            "--repository",
            str(tmp_path / "repo"),
            "--data-dir",
            cfg.data_dir,
            "--url",
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode != 0
    assert url in result.stderr and "nothing was published" in result.stderr, result.stderr[-2000:]
    assert not (Path(tmp_path) / "repo").exists()  # checked before the (long) export


def test_publish_refuses_a_version_that_fails_the_gate(trained, medimg_cmd, tmp_path) -> None:
    """``--gate``: the version's run is read, the decision printed and logged, and nothing
    is written when it fails."""
    cfg, outcome = trained
    gate = tmp_path / "gate.yaml"
    gate.write_text("min_auc_ci_low: 0.9999\nmax_ece: 1.0\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking_uri}
    args = ["publish", "--model", f"{outcome.model_name}/{outcome.version}", "--gate", str(gate)]
    args += ["--repository", str(tmp_path / "repo"), "--data-dir", cfg.data_dir]
    result = subprocess.run(
        [*medimg_cmd, *args], env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "FAIL test AUROC 95% CI lower bound" in result.stdout
    assert "ok   test ECE after calibration" in result.stdout
    assert "did not pass the gate" in result.stderr
    assert not (tmp_path / "repo").exists()
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=cfg.tracking_uri).get_run(outcome.run_id).data.tags
    assert tags["gate_decision"] == "failed" and tags["gate_source"] == str(gate)


@pytest.mark.slow  # an export of its own (~1 min); the upload itself is in tests/integration/test_repository_s3.py
def test_publish_to_s3(trained, medimg_cmd, moto_endpoint, tmp_path) -> None:
    """``--repository s3://...`` against a real S3-protocol server (moto) on loopback: the
    three models land as Triton lays them out, and the next publish would be version 2."""
    from serving.repository import s3
    from serving.repository.layout import read_config, spec_from_config

    cfg, outcome = trained
    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    env = {**os.environ, **creds, "MLFLOW_TRACKING_URI": cfg.tracking_uri}
    os.environ.update(creds)
    try:
        client = s3.s3_client(moto_endpoint, max_attempts=1)
        client.create_bucket(Bucket="medimg-publish")
        url = "s3://medimg-publish/triton"
        result = subprocess.run(
            [
                *medimg_cmd,
                "publish",
                "--model",
                f"{outcome.model_name}@champion",
                "--repository",
                url,
                "--s3-endpoint",
                moto_endpoint,
                "--data-dir",
                cfg.data_dir,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"as version 1 of {outcome.model_name}_preprocess" in result.stdout
        local = tmp_path / "downloaded"
        s3.download_repository(url, local, client)
        name = outcome.model_name
        assert (local / f"{name}_onnx" / "1" / "model.onnx").stat().st_size > 1_000_000
        assert (local / f"{name}_preprocess" / "1" / "model.py").is_file()
        assert (local / name / "1").is_dir()  # the ensemble's (empty) version directory
        for model in (name, f"{name}_onnx", f"{name}_preprocess"):
            assert spec_from_config(read_config(local / model)).model_name == name
        assert s3.next_remote_version(client, url, [f"{name}_onnx", f"{name}_preprocess"]) == 2
        assert s3.claimed_versions(client, url, f"{name}_onnx") == [1]  # claimed, then written
    finally:
        for key in creds:
            os.environ.pop(key, None)
