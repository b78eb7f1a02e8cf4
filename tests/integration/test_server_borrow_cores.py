"""Borrowing idle cores (serving/triton_backend/model.py) on the real server: two classifier
instances of one ONNX Runtime thread each; a lone request runs on every core, concurrent
ones on each instance's share, answers are the same either way, and the lock file goes
with the server::

    python -m pytest tests/integration/test_server_borrow_cores.py -q
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from serving.repository.layout import read_config, write_model_set
from serving.repository.model_config import RepositoryOptions
from serving.server.process import TritonServer
from tests.fixtures.triton import MODEL, free_ports, running_server

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 or more cores"),
]
CLASSIFIER = f"{MODEL}_onnx"
RUNS = re.compile(r"model \S+: (\d+) of (\d+) runs on every core")


def _infer(url: str, x: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url=url)
    try:
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = grpcclient.InferRequestedOutput("probabilities")
        return client.infer(CLASSIFIER, [inp], outputs=[out]).as_numpy("probabilities")
    finally:
        client.close()


def _serve_and_count(repo, log, reference, *, lone: int, concurrent: int):
    """``lone`` requests one after another, then ``concurrent`` batches of 32 from 8
    threads; every answer checked. Returns the stopped server, whether its core lock existed
    while it served, and each instance's (wide runs, all runs) from its finalize line."""
    rng = np.random.default_rng(0)
    with_lock = None
    for server in running_server(repo, log):
        with_lock = server.core_lock.exists()
        for _ in range(lone):
            x = rng.random((1, 1, 32, 32), dtype=np.float32)
            np.testing.assert_allclose(_infer(server.grpc_url, x), reference(x), atol=1e-5)
        batches = [rng.random((32, 1, 32, 32), dtype=np.float32) for _ in range(concurrent)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda x, u=server.grpc_url: _infer(u, x), batches))
        for x, got in zip(batches, answers, strict=True):
            np.testing.assert_allclose(got, reference(x), atol=1e-5)
    counts = [tuple(map(int, m)) for m in RUNS.findall(log.read_text())]
    return server, with_lock, counts


def test_lone_requests_borrow_idle_cores_and_busy_ones_do_not(
    triton_cache_dir, tiny_classifier_spec, tiny_classifier_onnx, tmp_path
):
    session = ort.InferenceSession(str(tiny_classifier_onnx), providers=["CPUExecutionProvider"])
    reference = lambda x: session.run(None, {"input": x})[0]  # noqa: E731
    repo = tmp_path / "repository"
    write_model_set(repo, tiny_classifier_spec, tiny_classifier_onnx, RepositoryOptions())
    assert read_config(repo / CLASSIFIER).parameters["borrow_idle_cores"].string_value == "1"

    log = tmp_path / "server.log"
    server, with_lock, counts = _serve_and_count(repo, log, reference, lone=20, concurrent=48)
    assert with_lock, f"no core lock at {server.core_lock} while serving"
    assert not server.core_lock.exists()  # removed on stop
    assert len(counts) == 2, f"expected one line per instance in {log}: {counts}"
    wide = sum(w for w, _ in counts)
    runs = sum(n for _, n in counts)
    assert wide >= 20  # every lone request (plus warmups that did not overlap)
    assert runs - wide >= 1  # two instances busy at once: one of them ran on its share
    assert runs == 20 + 48 + 2  # every run counted: batches of 32 never merge; 2 warmups
    cores = len(os.sched_getaffinity(0))  # the defaults: 2 instances of cores / 2 threads
    line = (
        f"{cores // 2} thread(s), on {cores} when no other instance runs; "
        "threads stop spinning after each run"
    )
    found = re.findall(r'model (\S+): ONNX Runtime on ([^"\n]*)', log.read_text())
    assert found == [(CLASSIFIER, line)] * 2


def test_no_borrowing_when_turned_off(
    triton_cache_dir, tiny_classifier_spec, tiny_classifier_onnx, tmp_path
):
    session = ort.InferenceSession(str(tiny_classifier_onnx), providers=["CPUExecutionProvider"])
    reference = lambda x: session.run(None, {"input": x})[0]  # noqa: E731
    repo = tmp_path / "repository"
    options = RepositoryOptions(borrow_idle_cores=False)
    write_model_set(repo, tiny_classifier_spec, tiny_classifier_onnx, options)
    log = tmp_path / "server.log"
    _, with_lock, counts = _serve_and_count(repo, log, reference, lone=3, concurrent=8)
    assert counts == [] and not with_lock


def test_an_unusable_core_lock_still_serves(
    triton_cache_dir, tiny_classifier_spec, tiny_classifier_onnx, tmp_path
):
    """The lock cannot be opened: a warning that names it, and every instance on its share."""
    session = ort.InferenceSession(str(tiny_classifier_onnx), providers=["CPUExecutionProvider"])
    repo = tmp_path / "repository"
    write_model_set(repo, tiny_classifier_spec, tiny_classifier_onnx, RepositoryOptions())
    log = tmp_path / "server.log"
    server = TritonServer(repo, log_file=log, **free_ports())
    server.core_lock = tmp_path / "no-such-dir" / "cores"
    with server:
        x = np.random.default_rng(1).random((2, 1, 32, 32), dtype=np.float32)
        got = _infer(server.grpc_url, x)
    np.testing.assert_allclose(got, session.run(None, {"input": x})[0], atol=1e-5)
    text = log.read_text()
    assert "no borrowing of idle cores: cannot open the core lock" in text
    assert str(server.core_lock) in text
    assert not RUNS.findall(text)


def test_one_instance_over_every_core_stops_spinning_between_runs(
    triton_cache_dir, tiny_classifier_spec, tiny_classifier_onnx, tmp_path
):
    """One instance of two threads (what tune-server may pick for latency): no borrowing,
    threads that sleep between runs (said in the log), the same answers."""
    session = ort.InferenceSession(str(tiny_classifier_onnx), providers=["CPUExecutionProvider"])
    reference = lambda x: session.run(None, {"input": x})[0]  # noqa: E731
    repo = tmp_path / "repository"
    options = RepositoryOptions(instance_count=1, intra_op_threads=2)
    write_model_set(repo, tiny_classifier_spec, tiny_classifier_onnx, options)
    log = tmp_path / "server.log"
    _, with_lock, counts = _serve_and_count(repo, log, reference, lone=3, concurrent=8)
    assert counts == [] and not with_lock
    assert re.findall(r'model (\S+): ONNX Runtime on ([^"\n]*)', log.read_text()) == [
        (CLASSIFIER, "2 thread(s); threads stop spinning after each run")
    ]
