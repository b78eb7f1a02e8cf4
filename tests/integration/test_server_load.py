"""Bounded load test against one real server: 8 concurrent clients (4 HTTP through the
guard, 4 gRPC) send PNG, JPEG and DICOM bytes to the ensemble for a fixed time. Not one
request may fail or come back with other probabilities than ONNX Runtime gives here, and
the server's memory (RSS of tritonserver, its backend stubs and the HTTP guard) at the end
may exceed the level after warmup by at most RSS_MARGIN::

    python -m pytest tests/integration/test_server_load.py -q -s
"""

from __future__ import annotations

import threading
import time

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from serving.server.process import TritonServer
from tests.fixtures.requests import encoded, in_process, infer_bytes
from tests.fixtures.triton import MODEL, server_fixture

pytestmark = pytest.mark.timeout(180)
CLIENTS = {"http": 4, "grpc": 4}
WARMUP_S, MEASURE_S = 3.0, 8.0
RSS_MARGIN = 64 << 20  # bytes the server may grow after warmup (allocator arenas, caches)


server = server_fixture()


def server_rss(server: TritonServer) -> int:
    """Resident bytes of tritonserver, its children (Python-backend stubs) and the guard."""
    root = psutil.Process(server.pid)
    processes = [root, *root.children(recursive=True)]
    if server.guard_pid is not None:
        processes.append(psutil.Process(server.guard_pid))
    return sum(p.memory_info().rss for p in processes)


def test_concurrent_clients_see_no_failure_and_memory_stays_flat(
    server, tiny_classifier_spec, tiny_classifier_onnx
):
    images = [encoded("png"), encoded("jpeg"), encoded("dicom")]
    expected = [in_process(tiny_classifier_spec, tiny_classifier_onnx, d) for d in images]
    stop, errors = threading.Event(), []
    done = {protocol: 0 for protocol in CLIENTS}
    lock = threading.Lock()

    def client_loop(protocol: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        if protocol == "http":
            client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
            module = httpclient
        else:
            client, module = grpcclient.InferenceServerClient(server.grpc_url), grpcclient
        try:
            while not stop.is_set():
                rows = rng.integers(0, len(images), size=int(rng.integers(1, 4)))
                try:
                    got = infer_bytes(client, module, MODEL, [images[r] for r in rows])
                    np.testing.assert_allclose(got, [expected[r] for r in rows], atol=1e-4)
                except Exception as exc:  # a failed request or a wrong answer
                    with lock:
                        errors.append(f"{protocol}: {type(exc).__name__}: {exc}"[:300])
                    continue
                with lock:
                    done[protocol] += 1
        finally:
            client.close()

    threads = [
        threading.Thread(target=client_loop, args=(protocol, 100 * i + n), daemon=True)
        for i, (protocol, count) in enumerate(CLIENTS.items())
        for n in range(count)
    ]
    for thread in threads:
        thread.start()
    time.sleep(WARMUP_S)
    warm_rss, warm_done = server_rss(server), dict(done)
    time.sleep(MEASURE_S)
    end_rss = server_rss(server)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    measured = {p: done[p] - warm_done[p] for p in done}
    print(
        f"\nload: {sum(measured.values())} requests in {MEASURE_S:.0f} s after warmup "
        f"({measured}); server RSS {warm_rss / 2**20:.1f} MiB after warmup, "
        f"{end_rss / 2**20:.1f} MiB at the end (margin {RSS_MARGIN >> 20} MiB)"
    )

    assert not errors, f"{len(errors)} failed requests, e.g. {errors[:5]}"
    assert all(not thread.is_alive() for thread in threads)
    assert all(n > 0 for n in measured.values()), measured  # both protocols kept serving
    assert end_rss <= warm_rss + RSS_MARGIN, (warm_rss, end_rss)
    assert server.running()
