"""``medimg bench`` against a real tritonserver serving the tiny model set: the CSV and
latency curve it writes, and tensors through system shared memory, cleaned up after::

    python -m pytest tests/integration/test_bench.py -q
"""

from __future__ import annotations

import csv
import os
import subprocess

import pytest

from serving.perf.bench import BenchOptions
from tests.fixtures.triton import MODEL, server_fixture

pytestmark = pytest.mark.timeout(300)


server = server_fixture()


def _run(medimg_cmd, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*medimg_cmd, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_bench_writes_csv_and_curve(server, medimg_cmd, tmp_path) -> None:
    result = _run(
        medimg_cmd,
        "bench",
        "--model",
        f"{MODEL}_onnx",
        "--url",
        server.grpc_url,
        "--protocol",
        "grpc",
        "--concurrency",
        "1,4",
        "--duration-s",
        "1.5",
        "--warmup-s",
        "0.3",
        "--out",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    csv_path = tmp_path / f"bench-{MODEL}_onnx-grpc-b1.csv"
    rows = list(csv.DictReader(csv_path.open()))
    assert [int(r["concurrency"]) for r in rows] == [1, 4]
    for r in rows:
        assert int(r["failed"]) == 0 and int(r["requests"]) > 10
        ms = [float(r[k]) for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms")]
        assert 0 < ms[0] <= ms[1] <= ms[2] <= ms[3]
        throughput = int(r["requests"]) / float(r["duration_s"])
        assert float(r["throughput"]) == pytest.approx(throughput, rel=1e-2)
        assert float(r["server_compute_infer_us"]) > 0 and float(r["server_queue_us"]) > 0
        assert float(r["server_avg_batch"]) >= 1
        # the load generator's CPU per request: some, and at most all cores for its share
        assert 0 < float(r["client_cpu_ms"]) < 1000 * os.cpu_count() / float(r["throughput"])
    # the server's own time for a request cannot exceed what the client waited for it
    split = sum(
        float(rows[0][f"server_{k}_us"])
        for k in ("queue", "compute_input", "compute_infer", "compute_output")
    )
    assert split / 1e3 < float(rows[0]["p99_ms"])
    png = tmp_path / f"bench-{MODEL}_onnx-grpc-b1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_through_shared_memory_cleans_up(server) -> None:
    import tritonclient.grpc as grpcclient

    from serving.perf.bench import run_bench

    opts = BenchOptions(
        url=server.grpc_url,
        protocol="grpc",
        model=f"{MODEL}_onnx",
        concurrency=(1, 3),
        duration_s=0.7,
        warmup_s=0.1,
        shared_memory=True,
    )
    results = run_bench(opts)
    assert [r.failed for r in results] == [0, 0] and all(r.requests > 5 for r in results)
    status = grpcclient.InferenceServerClient(server.grpc_url).get_system_shared_memory_status()
    assert not status.regions  # every region unregistered
    with pytest.raises(Exception, match="needs a tensor model"):
        run_bench(
            BenchOptions(
                url=server.grpc_url,
                protocol="grpc",
                model=MODEL,
                concurrency=(1,),
                duration_s=0.2,
                shared_memory=True,
            )
        )
