"""The loopback stack of tests/infra/test_loopback_cluster.py, as one module-scoped fixture:
PostgreSQL 15, moto's S3 server, an MLflow server on both, a two-node Ray cluster with its
dashboard (the job API), Prometheus (scraping the Triton the test starts later, on ports
picked here). Started in parallel where nothing depends on another; stopped in reverse by
the PIDs held, each stop on the timeline, which is printed and written to timeline.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.cluster import (
    Postgres,
    Service,
    Timeline,
    free_ports,
    python_module,
    start_ray_node,
    start_service,
    wait_http,
    wait_ray_started,
)
from tests.fixtures.pipeline import FAST_RAY

BUCKET = "medimg-infra"  # MLflow artifacts under mlflow/, Ray storage under ray/, Triton's models/
MODEL = "pneumoniamnist-densenet121"
MEDIMG = str(Path(sys.executable).parent / "medimg")
RULES = Path(__file__).resolve().parents[2] / "infra" / "monitoring" / "rules" / "triton.rules.yml"


@dataclass
class Stack:
    timeline: Timeline
    logs: Path
    env: dict[str, str]  # what every child gets: S3 credentials, MLflow's URL, Ray's temp dir
    data_dir: Path
    pg: Postgres
    s3: Service
    mlflow: Service
    head: Service
    node: Service
    prometheus: Service
    triton_ports: dict[str, int]  # http (the guard), grpc, metrics: Prometheus scrapes metrics
    serve: Service | None = None  # `medimg serve`, started by the test

    @property
    def s3_url(self) -> str:
        return self.s3.url()

    def medimg(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [MEDIMG, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )


def write_prometheus_config(path: Path, metrics_port: int, rules: Path | None) -> Path:
    """Prometheus scraping tritonserver's metrics port every second as job ``triton-metrics``,
    evaluating ``rules`` (if given) every second."""
    lines = [
        "global:",
        "  scrape_interval: 1s",
        "  evaluation_interval: 1s",
        *(["rule_files:", f"  - {json.dumps(str(rules))}"] if rules else []),
        "scrape_configs:",
        "  - job_name: triton-metrics",
        "    scrape_interval: 1s",
        "    metrics_path: /metrics",
        "    static_configs:",
        f'      - targets: ["127.0.0.1:{metrics_port}"]',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _env(work: Path, ray_tmp: Path, data_dir: Path) -> dict[str, str]:
    env = {**os.environ, **FAST_RAY, "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(work / "tmp")}
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    env.pop("MEDIMG_S3_ENDPOINT", None)  # every command names its endpoint
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",  # tritonserver's AWS SDK: no instance-metadata probe
        AWS_CONFIG_FILE=str(work / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(work / "no-aws-credentials"),
        MEDIMG_DATA_DIR=str(data_dir),
        # `ray start --block` drains its node on SIGTERM for up to 30 s; the head never
        # finishes draining (its dashboard and job agent hold leases): bound it
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5",
    )
    (work / "tmp").mkdir(exist_ok=True)
    return env


def start_mlflow(stack_env: dict, logs: Path, timeline: Timeline, pg: Postgres, port: int):
    """`mlflow server` on PostgreSQL, artifacts proxied to the bucket (MLFLOW_S3_ENDPOINT_URL)."""
    command = python_module("mlflow", "server", "--host", "127.0.0.1", "--port", str(port))
    command += ["--backend-store-uri", pg.uri("mlflow"), "--workers", "1", "--serve-artifacts"]
    command += ["--artifacts-destination", f"s3://{BUCKET}/mlflow"]
    command += ["--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
    service = start_service("mlflow", command, logs, timeline, env=stack_env)
    service.ports = {"http": port}
    return service


def stop_component(service: Service, timeline: Timeline, timeout: float = 30) -> None:
    """Stop ``service`` and everything it started, by the PID held; on the timeline."""
    if service.proc.poll() is not None:
        return
    started = timeline.now()
    strays = service.stop_tree(timeout=timeout)
    took = timeline.now() - started
    timeline.mark(f"{service.name} stopped in {took:.1f} s (exit {service.proc.returncode})")
    assert not strays, f"{service.name} left processes behind: {strays}"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, triton_cache_dir
) -> Iterator[Stack]:
    timeline = Timeline()
    work = tmp_path_factory.mktemp("loopback_cluster")
    logs = work / "logs"
    logs.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="medimg-ray-"))  # short: Ray's sockets live here
    env = _env(work, ray_tmp, data_dir)
    mlflow_port, s3_port, prom_port, *triton = free_ports(6)
    triton_ports = dict(zip(("http", "grpc", "metrics"), triton, strict=True))
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{mlflow_port}"
    env["MLFLOW_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{s3_port}"  # for the MLflow server
    aws = pytest.MonkeyPatch()  # this process talks to S3 too
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        aws.delenv(name, raising=False)
    for name in [k for k in env if k.startswith("AWS_")]:
        aws.setenv(name, env[name])
    started: list[Service] = []
    built: list[Stack] = []
    pg = Postgres(logs, timeline)
    try:
        started.append(pg.start())
        moto = python_module("moto.server", "-H", "127.0.0.1", "-p", str(s3_port))
        s3 = start_service("moto-s3", moto, logs, timeline, env=env)
        s3.ports = {"http": s3_port}
        started.append(s3)
        head = start_ray_node("ray-head", logs, timeline, env)
        started.append(head)
        config = write_prometheus_config(
            work / "prometheus.yml", triton_ports["metrics"], RULES if RULES.is_file() else None
        )
        prom = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}"]
        prometheus = start_service(
            "prometheus", [*prom, f"--web.listen-address=127.0.0.1:{prom_port}"], logs, timeline
        )
        prometheus.ports = {"http": prom_port}
        started.append(prometheus)
        pg.wait_ready()
        pg.create_database("mlflow")
        wait_http(timeline, s3, "/")
        from serving.repository.s3 import s3_client

        s3_client(s3.url()).create_bucket(Bucket=BUCKET)
        mlflow = start_mlflow(env, logs, timeline, pg, mlflow_port)
        started.append(mlflow)
        wait_ray_started(timeline, head)
        node = start_ray_node("ray-node2", logs, timeline, env, head=head)
        started.append(node)
        wait_http(timeline, prometheus, "/-/ready")
        wait_http(timeline, mlflow, "/health", timeout=180)
        wait_ray_started(timeline, node)
        built.append(
            Stack(
                timeline, logs, env, data_dir, pg, s3, mlflow, head, node, prometheus, triton_ports
            )
        )
        yield built[0]
    finally:
        errors = []
        try:
            serve = [built[0].serve] if built and built[0].serve else []
            for service in [*serve, *reversed(started)]:
                try:
                    if not service.name.startswith("postgres"):
                        stop_component(service, timeline, 90 if service in serve else 30)
                except AssertionError as exc:
                    errors.append(str(exc))
        finally:
            pg.stop()
            timeline.mark("postgres stopped")
            aws.undo()
            shutil.rmtree(ray_tmp, ignore_errors=True)
            (work / "timeline.json").write_text(
                json.dumps({"events": timeline.events, "results": timeline.results}, indent=2)
            )
            print(f"\n--- loopback cluster timeline ({work / 'timeline.json'})")
            print(timeline.report())
        assert not errors, errors
