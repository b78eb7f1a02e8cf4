"""The cluster topology of infra/, for real, on loopback: PostgreSQL 15 as MLflow's backend
store, moto's S3 server as artifact store, Ray storage and model repository, an MLflow
server, a two-node Ray cluster that `medimg train` is submitted to with `ray job submit`,
`medimg publish` into S3, `medimg serve` polling that S3 repository, Prometheus scraping
Triton with infra/monitoring's alert rules. PostgreSQL is SIGKILLed and restarted mid-way
(nothing registered is lost, the same MLflow server recovers); a publish to a dead S3
endpoint fails fast while serving goes on. Last the S3 server itself stops: `publish` fails
fast naming it, a Triton that read the repository at start (mode none, as infra/k8s runs it)
keeps serving, and what the polling one does is recorded (Triton 2.51 in poll mode unloads
every model when it cannot list the repository).

Every component is a process this test starts and stops by the PID it holds
(tests/fixtures/cluster.py, tests/infra/stack.py); a timeline is printed at the end::

    .venv/bin/python -m pytest -m infra tests/infra -p no:randomly -s
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from tests.fixtures.cluster import free_ports, http_get, prometheus_api, start_service, wait_until
from tests.infra.stack import BUCKET, MEDIMG, MODEL, RULES, Stack, stop_component

pytestmark = [pytest.mark.infra, pytest.mark.timeout(600)]

REQUESTS = 12  # single-image inference requests sent through the HTTP guard
JOB = "medimg-train-1"
POLL_FAILED = re.compile(r".*(failed to poll model repository|Failed to determine modification).*")


def _train_on_ray(stack: Stack, work: Path) -> tuple[str, set[str]]:
    """`medimg train` submitted as a Ray job (as KubeRay's submitter does: nothing to
    download, the code is installed) onto both nodes; returns (the registered version, the
    node ids Ray's state API says its train workers ran on)."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    dashboard = stack.head.url("dashboard")
    train = [MEDIMG, "train", "--dataset", "pneumoniamnist", "--data-dir", str(stack.data_dir)]
    train += ["--epochs", "1", "--max-train-samples", "128", "--image-size", "32"]
    train += ["--batch-size", "32", "--workers", "2", "--cpus-per-worker", "1"]
    train += ["--ray-address", "auto", "--storage-path", f"s3://{BUCKET}/ray"]
    train += ["--storage-endpoint", stack.s3_url]
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": stack.mlflow.url()}}
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", dashboard]
    submit += ["--submission-id", JOB, "--runtime-env-json", json.dumps(runtime_env), "--"]
    stack.timeline.mark("ray job submit: medimg train")
    with open(work / "ray-job.log", "w") as out:
        code = subprocess.run(
            [*submit, *train], env=stack.env, stdout=out, stderr=subprocess.STDOUT, timeout=420
        ).returncode
    output = (work / "ray-job.log").read_text()
    assert code == 0, output[-5000:]
    assert JobSubmissionClient(dashboard).get_job_status(JOB) == "SUCCEEDED"
    stack.timeline.mark(f"ray job {JOB} SUCCEEDED")
    version = output.split(f"registered: {MODEL} version ")[1].split()[0]
    nodes = {n.node_id for n in list_nodes(address=dashboard) if n.state == "ALIVE"}
    workers = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")])
    assert len(nodes) == 2 and len(workers) >= 2, (nodes, workers)
    assert {w.node_id for w in workers} <= nodes
    return version, {w.node_id for w in workers}


def _bucket_keys(stack: Stack) -> list[str]:
    from serving.repository.s3 import s3_client

    pages = s3_client(stack.s3_url).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _check_registry(stack: Stack, version: str) -> dict:
    """The version is champion in MLflow (PostgreSQL); its model files and Ray's checkpoints
    are in the bucket; the run says its two ranks ran on two nodes."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow.url())
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == version
    run = client.get_run(champion.run_id)
    assert run.info.status == "FINISHED"
    nodes = run.data.tags["ray_worker_nodes"].split(",")  # HOST/NODE_ID of each rank
    assert len({n.split("/")[1] for n in nodes}) == 2, nodes
    keys = _bucket_keys(stack)
    model_id = champion.source.removeprefix("models:/")  # MLflow 3: models:/m-<id>
    assert any(k.startswith("mlflow/") and model_id in k and k.endswith("/MLmodel") for k in keys)
    assert any(k.startswith("ray/") and "/checkpoint_" in k for k in keys), keys
    return {"run_id": champion.run_id, "source": champion.source, "bucket_objects": len(keys)}


def _mlflow_version(stack: Stack, version: str) -> int | None:
    """HTTP status of MLflow's model-versions/get (raw: MlflowClient retries for minutes)."""
    query = f"name={MODEL}&version={version}"
    answer = http_get(f"{stack.mlflow.url()}/api/2.0/mlflow/model-versions/get?{query}", 5)
    return answer[0] if answer else None


def _kill_and_restart_postgres(stack: Stack, version: str) -> dict:
    """SIGKILL the postmaster, restart it: the same MLflow server process lists the version
    and its alias again (its pool pre-pings) and can write."""
    from mlflow import MlflowClient

    stack.pg.kill()
    during = _mlflow_version(stack, version)
    stack.pg.start()
    stack.pg.wait_ready()
    started = time.monotonic()
    wait_until("MLflow answering again", lambda: _mlflow_version(stack, version) == 200, None, 60)
    recovered = time.monotonic() - started
    assert stack.mlflow.proc.poll() is None  # not restarted
    client = MlflowClient(tracking_uri=stack.mlflow.url())
    assert client.get_model_version_by_alias(MODEL, "champion").version == version
    client.set_model_version_tag(MODEL, version, "survived", "postgres SIGKILL")
    stack.timeline.mark("MLflow (same process) lists the version after the restart")
    return {"mlflow_status_while_down": during, "recovered_s": round(recovered, 1)}


def _publish(stack: Stack, endpoint: str = "", timeout: float = 300) -> tuple[str, int, float]:
    """(stdout+stderr, exit code or -1 on timeout, seconds) of `medimg publish` into S3."""
    args = ["publish", "--model", f"{MODEL}@champion", "--repository", f"s3://{BUCKET}/models"]
    args += ["--s3-endpoint", endpoint or stack.s3_url, "--data-dir", str(stack.data_dir)]
    started = time.monotonic()
    try:
        done = stack.medimg(*args, "--tracking-uri", stack.mlflow.url(), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        parts = [
            part.decode(errors="replace") if isinstance(part, bytes) else part or ""
            for part in (exc.output, exc.stderr)
        ]
        return "".join(parts), -1, time.monotonic() - started
    return done.stdout + done.stderr, done.returncode, time.monotonic() - started


def _error_line(output: str) -> str:
    return next((ln for ln in output.splitlines() if ln.startswith("error:")), output[-300:])


def _serve(stack: Stack, mode: str = "poll"):
    """`medimg serve` on the S3 repository (the endpoint converted to Triton's form): polling
    it (``stack.serve``, the one Prometheus scrapes) or, with ``mode`` none, reading it once."""
    ports = (
        stack.triton_ports
        if mode == "poll"
        else dict(zip(("http", "grpc", "metrics"), free_ports(3), strict=True))
    )
    args = [MEDIMG, "serve", "--repository", f"s3://{BUCKET}/models"]
    args += ["--s3-endpoint", stack.s3_url, "--model-control-mode", mode]
    args += ["--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"])]
    args += ["--metrics-port", str(ports["metrics"])]
    env = stack.env
    if mode != "poll":  # its tritonserver log apart from the polling one's (see _poll_failure)
        env = {**env, "TMPDIR": str(stack.logs / f"tmp-{mode}")}
        Path(env["TMPDIR"]).mkdir(exist_ok=True)
    serve = start_service(f"medimg-serve-{mode}", args, stack.logs, stack.timeline, env=env)
    if mode == "poll":
        stack.serve = serve
    serve.ports = ports
    wait_until("Triton ready", lambda: "Triton ready" in serve.tail(), serve, 180)
    stack.timeline.ready(serve)
    assert f"serving s3://http://127.0.0.1:{stack.s3.ports['http']}/{BUCKET}/models" in serve.tail()
    return serve


def _ready(stack: Stack, model: str, version: int, serve=None) -> bool:
    serve = serve or stack.serve
    assert serve is not None
    answer = http_get(f"{serve.url()}/v2/models/{model}/versions/{version}/ready")
    return answer is not None and answer[0] == 200


def _served(stack: Stack, images: np.ndarray, serve=None) -> np.ndarray:
    """Probabilities of ``images``, one request each, through the HTTP guard to the ensemble."""
    from serving.clients.inputs import png_bytes
    from serving.clients.sync import TritonClassifier

    serve = serve or stack.serve
    assert serve is not None
    with TritonClassifier(f"127.0.0.1:{serve.ports['http']}", "http", model=MODEL) as client:
        return np.concatenate([client.infer_bytes([png_bytes(image)]) for image in images])


def _in_process(stack: Stack, version: str, images: np.ndarray) -> np.ndarray:
    """The registered version loaded from MLflow (training.registry) and run here."""
    import torch

    from training.registry import load_model

    loaded = load_model(stack.mlflow.url(), f"models:/{MODEL}/{version}")
    with torch.no_grad():
        return loaded.module(torch.from_numpy(loaded.spec.preprocess(images))).numpy()


def _poll_failure(stack: Stack) -> str | None:
    """tritonserver's log line about a failed poll of the repository (`medimg serve` keeps
    the log in a temporary file under TMPDIR)."""
    (log,) = Path(stack.env["TMPDIR"]).glob("medimg-tritonserver-*.log")
    found = POLL_FAILED.search(log.read_text(errors="replace"))
    return found.group(0)[:300] if found else None


def _promql(stack: Stack, query: str) -> float | None:
    data = prometheus_api(stack.prometheus, f"/api/v1/query?query={quote(query)}")
    return float(data["result"][0]["value"][1]) if data and data["result"] else None


def _check_prometheus(stack: Stack) -> dict:
    query = f'sum(nv_inference_request_success{{job="triton-metrics",model="{MODEL}"}})'
    counted = lambda: _promql(stack, query) == REQUESTS  # noqa: E731
    wait_until(f"Prometheus counting {REQUESTS} requests", counted, stack.prometheus, 30, 0.5)
    assert _promql(stack, 'up{job="triton-metrics"}') == 1
    stack.timeline.mark(f"PromQL: {query} = {REQUESTS}")
    if not RULES.is_file():
        print(f"\nSKIPPED the alert rules: {RULES} does not exist")
        return {"query": query, "value": REQUESTS, "rules": f"skipped: no {RULES}"}
    groups = prometheus_api(stack.prometheus, "/api/v1/rules")["groups"]
    health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
    assert groups and set(health.values()) == {"ok"}, health
    assert _promql(stack, 'count(ALERTS{alertstate="firing"})') is None
    return {"query": query, "value": REQUESTS, "rules": {g["name"]: health for g in groups}}


def test_train_register_publish_serve_monitor_and_survive(stack: Stack, tmp_path: Path) -> None:
    timeline, results = stack.timeline, stack.timeline.results
    version, worker_nodes = _train_on_ray(stack, tmp_path)
    assert len(worker_nodes) == 2, f"train workers ran on {worker_nodes}, not on two nodes"
    results["train_worker_nodes"] = sorted(n[:12] for n in worker_nodes)
    for node in (stack.node, stack.head):  # Ray's part is done: its CPUs back to the rest
        stop_component(node, timeline)
    results["registry"] = _check_registry(stack, version)
    results["postgres_restart"] = _kill_and_restart_postgres(stack, version)

    output, code, _ = _publish(stack)
    assert code == 0 and "as version 1 of" in output, output[-3000:]
    timeline.mark("published version 1 to S3")
    _serve(stack)
    assert _ready(stack, f"{MODEL}_onnx", 1)
    output, code, _ = _publish(stack)
    assert code == 0 and "as version 2 of" in output, output[-3000:]
    timeline.mark("published version 2 to S3")
    picked_up = lambda: _ready(stack, f"{MODEL}_onnx", 2)  # noqa: E731
    wait_until("version 2 polled in", picked_up, stack.serve, 90, 0.5)
    timeline.mark("Triton serves version 2 (poll)")

    from training.data import medmnist_arrays

    images = medmnist_arrays("pneumoniamnist", "test", stack.data_dir)[0][:REQUESTS]
    served = _served(stack, images)
    diff = float(np.abs(served - _in_process(stack, version, images)).max())
    results["max_abs_diff_served_vs_in_process"] = diff
    assert diff <= 1e-5, diff
    timeline.mark(f"{REQUESTS} requests through the HTTP guard equal in-process")
    results["prometheus"] = _check_prometheus(stack)

    dead = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    output, code, seconds = _publish(stack, endpoint=dead)
    assert code == 1 and f"cannot reach the S3 endpoint {dead}" in output, output[-3000:]
    assert seconds < 30, seconds
    assert np.allclose(_served(stack, images[:2]), served[:2], atol=1e-6)  # still serving
    results["publish_dead_endpoint"] = {"s": round(seconds, 1), "error": _error_line(output)}
    timeline.mark(f"publish to a dead S3 endpoint failed in {seconds:.1f} s; serving goes on")

    _s3_goes_away(stack, images[:2], served[:2])


def _s3_goes_away(stack: Stack, images: np.ndarray, served: np.ndarray) -> None:
    """The S3 server stopped (MLflow's artifacts are there too): `publish` fails fast naming
    the endpoint; a Triton that read the repository at start (mode none, what infra/k8s and
    infra/compose run) keeps serving. The polling one's fate is recorded: Triton 2.51
    unloads every model when listing the repository fails at a poll
    (ModelRepositoryManager::PollAndUpdateInternal deletes whatever the poll did not see)."""
    timeline, results = stack.timeline, stack.timeline.results
    steady = _serve(stack, "none")
    try:
        assert _ready(stack, f"{MODEL}_onnx", 2, steady)
        stack.s3.stop()
        timeline.mark("S3 server stopped")
        output, code, seconds = _publish(stack, timeout=60)
        results["publish_s3_stopped"] = {"s": round(seconds, 1), "error": _error_line(output)}
        assert code == 1 and f"cannot reach the S3 endpoint {stack.s3_url}" in output, output
        assert seconds < 30, seconds
        timeline.mark(f"publish with S3 stopped failed in {seconds:.1f} s")
        poll_error = wait_until(
            "a failed poll of S3", lambda: _poll_failure(stack), stack.serve, 60
        )
        time.sleep(3)  # an unload after the failed poll is asynchronous
        polling = _ready(stack, f"{MODEL}_onnx", 2) and _ready(stack, MODEL, 1)
        results["poll_mode_with_s3_stopped"] = {"error": poll_error, "still_serving": polling}
        timeline.mark(f"S3 down: the polling Triton {'serves' if polling else 'unloaded all'}")
        assert np.allclose(_served(stack, images, steady), served, atol=1e-6)
        results["none_mode_with_s3_stopped"] = {"still_serving": True}
        timeline.mark("S3 down: the Triton in mode none still serves version 2")
    finally:
        stop_component(steady, timeline, timeout=90)
    assert stack.serve is not None
    stop_component(stack.serve, timeline, timeout=90)  # a poll in flight delays Triton's exit
