"""Single-image classification latency through Triton, HTTP against gRPC, beside in-process
ONNX Runtime: the work of ``benchmarks/classify_latency.py``.

Starts the embedded tritonserver on free loopback ports over an exported repository, then,
interleaved in this one process so machine noise hits every path alike: one image per
request through :class:`serving.clients.sync.TritonClassifier` to the ensemble (read +
preprocess + infer), the same file read, preprocessed and run through the classifier's ONNX
file in process, and the whole ``medimg classify`` command (process start included)::

    python benchmarks/classify_latency.py --repository model_repository \\
        --image ../shared/data/samples/00000001_000.png --requests 200
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from serving.clients.sync import TritonClassifier
from serving.perf.accounting import BenchError
from serving.perf.comparison.model import find_classifier
from serving.perf.comparison.paths import free_ports, ort_session
from serving.server.network import find_free_port
from serving.server.process import TritonServer
from training.images import read_image

LABELS = {"http": "Triton HTTP  ", "grpc": "Triton gRPC  ", "inprocess": "ORT in-process"}


def percentiles(samples: list[float]) -> str:
    ms = np.asarray(samples) * 1000
    return (
        f"p50 {np.percentile(ms, 50):6.2f} ms  p90 {np.percentile(ms, 90):6.2f} ms  "
        f"p99 {np.percentile(ms, 99):6.2f} ms  ({len(ms)} requests)"
    )


def medimg_command() -> list[str]:
    """This environment's ``medimg`` console script, else the same entry point through this
    interpreter."""
    script = Path(sys.executable).parent / "medimg"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from serving.cli import main; sys.exit(main())"]


def cli_seconds(image: str, url: str, protocol: str, runs: int) -> float:
    """Median seconds of the whole ``medimg classify IMAGE`` command against ``url``."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        cmd = [*medimg_command(), "classify", image, "--url", url]
        done = subprocess.run([*cmd, "--protocol", protocol], capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"medimg classify failed: {done.stderr.strip()[-1000:]}")
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved(
    clients: dict[str, TritonClassifier], session, image: str, requests: int
) -> dict[str, list[float]]:
    """Seconds per request of every client and of in-process ONNX Runtime, taking turns."""
    name = session.get_inputs()[0].name
    preprocess = next(iter(clients.values())).preprocess  # the server's own spec

    def local() -> None:
        session.run(None, {name: preprocess(read_image(image))})

    for _ in range(10):  # warm up every path
        for client in clients.values():
            list(client.classify_files([image]))
        local()
    results: dict[str, list[float]] = {**{p: [] for p in clients}, "inprocess": []}
    for _ in range(requests):
        for protocol, client in clients.items():
            started = time.perf_counter()
            (pred,) = client.classify_files([image])
            results[protocol].append(time.perf_counter() - started)
            if pred.error:
                raise BenchError(f"{protocol}: {pred.error}")
        started = time.perf_counter()  # the same work in process: read, preprocess, infer
        local()
        results["inprocess"].append(time.perf_counter() - started)
    return results


def measure(repository: Path, image: str, requests: int, cli_runs: int) -> list[str]:
    """The report's lines; the last one ``http_p50/grpc_p50=R1 grpc_p50/inprocess_p50=R2``."""
    _, _, onnx_path = find_classifier(repository, "")
    session = ort_session(onnx_path)
    http, grpc, metrics = free_ports(3, find_free_port)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics) as srv:
        urls = {"http": f"127.0.0.1:{http}", "grpc": srv.grpc_url}
        clients = {p: TritonClassifier(urls[p], p) for p in ("http", "grpc")}
        try:
            results = interleaved(clients, session, image, requests)
            cli = {p: cli_seconds(image, urls[p], p, cli_runs) for p in ("http", "grpc")}
        finally:
            for client in clients.values():
                client.close()
    p50 = {k: float(np.percentile(v, 50)) for k, v in results.items()}
    return [
        f"model {clients['http'].model}, image {image}",
        *(f"{LABELS[name]} {percentiles(results[name])}" for name in LABELS),
        f"medimg classify (whole command, median of {cli_runs}): HTTP {cli['http']:.2f} s  "
        f"gRPC {cli['grpc']:.2f} s",
        f"http_p50/grpc_p50={p50['http'] / p50['grpc']:.2f} "
        f"grpc_p50/inprocess_p50={p50['grpc'] / p50['inprocess']:.2f}",
    ]
