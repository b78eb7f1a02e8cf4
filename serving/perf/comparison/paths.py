"""The three measured paths of ``benchmarks/serving_side_by_side.py``: (a) ONNX Runtime in
process (batch-size sweep, best batch, one-thread sessions side by side, batch-1 latency),
(b) Triton through :func:`serving.perf.bench.run_bench` against a tritonserver started here,
(c) the naive FastAPI + PyTorch-eager server (``naive_server.py``, started as
``python -m serving.cli.naive_server``) as its own process, stopped by its PID, under an
aiohttp closed-loop load::

    python -c "from serving.perf.comparison.paths import *; import numpy as np; \
print(inprocess_latency(ort_session('model.onnx'), np.zeros((8, 1, 64, 64), np.float32), 50))"
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from serving.perf.accounting import BenchError, PathResult
from serving.perf.comparison.settings import Settings

NAIVE_SERVER = "serving.cli.naive_server"  # the baseline's process entry (python -m)


# ---------------------------------------------------------------- (a) in process


def ort_session(onnx_path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def ort_throughput(session, images: np.ndarray, batch: int, seconds: float) -> float:
    """Images/s of back-to-back ``session.run`` at ``batch`` for about ``seconds``."""
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(images[:batch])
    session.run(None, {name: x})  # warm-up (allocations for this shape)
    runs, started = 0, time.perf_counter()
    while True:
        session.run(None, {name: x})
        runs += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and runs >= 3:
            return runs * batch / elapsed


def ort_latencies(session, images: np.ndarray, runs: int) -> np.ndarray:
    """Seconds of each of ``runs`` batch-1 runs, cycling over the images."""
    name = session.get_inputs()[0].name
    for i in range(10):
        session.run(None, {name: images[i : i + 1]})
    out = np.empty(runs)
    for i in range(runs):
        x = images[i % len(images)][None]
        started = time.perf_counter()
        session.run(None, {name: x})
        out[i] = time.perf_counter() - started
    return out


def inprocess_sweep(
    session, images: np.ndarray, batches: tuple[int, ...], seconds: float
) -> list[PathResult]:
    """Throughput at every batch size that runs (a reused model may bound the batch)."""
    rows = []
    for batch in batches:
        try:
            rate = ort_throughput(session, images, batch, seconds)
        except Exception as exc:  # e.g. a model exported with a smaller batch bound
            print(f"  in process batch {batch}: skipped ({type(exc).__name__})", flush=True)
            continue
        print(f"  in process batch {batch:3d}: {rate:7.1f} img/s", flush=True)
        rows.append(PathResult("inprocess", f"ORT in process b{batch}", 0, batch, rate, 0, 0, 0))
    return rows


def inprocess_best(session, images: np.ndarray, batch: int, seconds: float) -> PathResult:
    rate = ort_throughput(session, images, batch, seconds)
    label = f"(a) ORT in process, best batch {batch}"
    return PathResult("inprocess", label, 0, batch, rate, 0, 0, 0)


def inprocess_parallel(
    sessions: list, images: np.ndarray, batch: int, seconds: float
) -> PathResult:
    """One-thread sessions run side by side, one Python thread each (ONNX Runtime releases
    the GIL): what two Triton instances of one intra-op thread do. For information."""
    rates = [0.0] * len(sessions)

    def work(i: int) -> None:
        rates[i] = ort_throughput(sessions[i], images, batch, seconds)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    label = f"(a') ORT in process, {len(sessions)} x 1-thread sessions, batch {batch}"
    return PathResult("inprocess", label, 0, batch, sum(rates), 0, 0, 0)


def inprocess_latency(session, images: np.ndarray, runs: int) -> PathResult:
    """Batch-1 latency of ``runs`` back-to-back runs."""
    ms = ort_latencies(session, images, runs) * 1000
    return PathResult(
        "inprocess",
        "(a) ORT in process, batch 1",
        1,
        1,
        1000 / float(ms.mean()),
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        runs,
        samples_ms=ms.tolist(),
    )


# ---------------------------------------------------------------- (b) Triton


@contextlib.contextmanager
def triton_server(repository: Path, protocol: str) -> Iterator[str]:
    """tritonserver on free loopback ports over ``repository``; yields the URL of
    ``protocol`` (``host:port``) and stops the server when done."""
    from serving.server.network import find_free_port
    from serving.server.process import TritonServer

    ports = free_ports(3, find_free_port)
    server = TritonServer(repository, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2])
    with server:
        url = server.grpc_url if protocol == "grpc" else f"127.0.0.1:{ports[0]}"
        print(f"  tritonserver pid {server.pid} ready at {url} ({protocol})", flush=True)
        yield url


def triton_level(
    url: str, model: str, args: Settings, concurrency: int, label: str = "(b)"
) -> PathResult:
    """One :func:`serving.perf.bench.run_bench` level (medimg's Python client): single-image
    requests of random preprocessed tensors to the classifier ``model``."""
    from serving.perf.bench import BenchOptions, run_bench

    (r,) = run_bench(
        BenchOptions(
            url=url,
            protocol=args.protocol,
            model=model,
            concurrency=(concurrency,),
            batch_size=1,
            duration_s=args.duration_s,
            warmup_s=args.warmup_s,
            input="random",
            shared_memory=args.shared_memory == "system",
        )
    )
    return PathResult(
        "triton",
        f"{label} Triton {args.protocol}, medimg client"
        + (", system shm" if args.shared_memory == "system" else ""),
        r.concurrency,
        1,
        float(r.throughput),
        float(r.p50_ms),
        float(r.p99_ms),
        int(r.requests),
        int(r.failed),
        {
            **{k: float(v) for k, v in dict(r.server or {}).items()},
            "client_cpu_ms": r.client_cpu_ms,
        },
        samples_ms=list(r.latencies_ms),
    )


def free_ports(count: int, pick: Callable[[], int]) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = pick()
        if port not in ports:
            ports.append(port)
    return ports


# ---------------------------------------------------------------- (c) naive baseline


def start_naive(weights: Path, port: int, log_path: Path) -> subprocess.Popen:
    """The naive server as its own process on 127.0.0.1:``port``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", NAIVE_SERVER, "--weights", str(weights), "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_http_ok(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"naive server exited with code {process.returncode}:\n{tail}")
        with contextlib.suppress(OSError), opener.open(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise BenchError(f"naive server not answering {url} after {timeout:.0f} s (log {log_path})")


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process we started (by its PID), SIGKILL after ``timeout`` s."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def naive_server(weights: Path, workdir: Path) -> Iterator[str]:
    """The naive server on a free loopback port; yields its base URL, stops it by PID."""
    from serving.server.network import find_free_port

    port = find_free_port()
    log_path = workdir / "naive_server.log"
    process = start_naive(weights, port, log_path)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/health", process, log_path, timeout=180)
        print(f"  naive server pid {process.pid} ready at {base}", flush=True)
        yield base
    finally:
        stop_process(process)


async def _post_loop(
    session, url: str, body: bytes, concurrency: int, seconds: float
) -> tuple[list[float], int, float]:
    """``concurrency`` closed-loop tasks POSTing ``body`` back to back for ``seconds``:
    latencies (s) of the answered requests, how many failed, and the elapsed time."""
    import aiohttp

    latencies: list[float] = []
    failed = 0
    started = time.perf_counter()
    stop_at = started + seconds

    async def worker() -> None:
        nonlocal failed
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body) as response:
                    payload = await response.json()
                    ok = response.status == 200 and "probabilities" in payload
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failed, time.perf_counter() - started


async def http_load(
    url: str, body: bytes, concurrency: int, duration_s: float, warmup_s: float
) -> tuple[list[float], int, float]:
    """The naive server's load, measured as :func:`serving.perf.bench.run_bench` measures
    Triton: ``warmup_s`` unmeasured, then ``duration_s`` measured, one connection per task."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/octet-stream"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        if warmup_s:
            await _post_loop(session, url, body, concurrency, warmup_s)
        return await _post_loop(session, url, body, concurrency, duration_s)


def naive_level(base: str, image: np.ndarray, args: Settings) -> PathResult:
    """``--concurrency`` aiohttp tasks against the naive server for ``--duration-s``."""
    body = np.ascontiguousarray(image[None], dtype=np.float32).tobytes()
    latencies, failed, elapsed = asyncio.run(
        http_load(f"{base}/predict", body, args.concurrency, args.duration_s, args.warmup_s)
    )
    if not latencies:
        raise BenchError(f"the naive server at {base} answered no request ({failed} failed)")
    ms = np.asarray(latencies) * 1000
    return PathResult(
        "naive",
        "(c) FastAPI + PyTorch eager",
        args.concurrency,
        1,
        len(latencies) / elapsed,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        len(latencies),
        failed,
    )
