"""serving.server.process: the real tritonserver from the nvidia-pytriton wheel, serving the
tiny classifier.

One shared server for the whole module: readiness, HTTP/gRPC tensor inference on the
classifier ``MODEL_onnx``, batching, bad requests. Servers started, stopped and killed one
per test are in tests/integration/test_server_lifecycle.py::

    python -m pytest tests/integration/test_server.py -q
"""

from __future__ import annotations

import os
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serving.server.network import port_in_use
from serving.server.process import TritonServer
from tests.fixtures.triton import MODEL, children_of, free_ports, server_fixture
from training.errors import ServingError

pytestmark = pytest.mark.timeout(300)
CLASSIFIER = f"{MODEL}_onnx"  # tensors in; the ensemble MODEL (bytes in) is in test_ensemble.py


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def batching_repository(tiny_classifier_spec, tiny_classifier_onnx, tmp_path_factory) -> Path:
    """One classifier instance with a 20 ms queue delay, so that concurrent requests meet in
    the dynamic batcher (the defaults, no delay and two instances, rarely merge on a model
    this small)."""
    from serving.repository.layout import write_model_set
    from serving.repository.model_config import RepositoryOptions

    repo = tmp_path_factory.mktemp("server_repository")
    options = RepositoryOptions(max_queue_delay_us=20_000, instance_count=1)
    write_model_set(repo, tiny_classifier_spec, tiny_classifier_onnx, options)
    return repo


server = server_fixture("batching_repository")


@pytest.fixture(scope="module")
def reference(tiny_classifier_onnx):
    session = ort.InferenceSession(str(tiny_classifier_onnx), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


@pytest.fixture()
def http(server):
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    yield client
    client.close()


@pytest.fixture()
def grpc(server):
    client = grpcclient.InferenceServerClient(url=server.grpc_url)
    yield client
    client.close()


def _http_infer(client, x, datatype="FP32", class_count=0):
    inp = httpclient.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    out = httpclient.InferRequestedOutput("probabilities", class_count=class_count)
    return client.infer(CLASSIFIER, [inp], outputs=[out]).as_numpy("probabilities")


def _grpc_infer(client, x, datatype="FP32"):
    inp = grpcclient.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput("probabilities")
    return client.infer(CLASSIFIER, [inp], outputs=[out]).as_numpy("probabilities")


# -- one shared server -----------------------------------------------------------------------


def test_ready_and_endpoints(server, http):
    assert server.running()
    assert server.http_url == f"http://127.0.0.1:{server.http_port}"
    assert server.grpc_url == f"127.0.0.1:{server.grpc_port}"
    assert http.is_server_ready()
    assert all(http.is_model_ready(m) for m in (MODEL, CLASSIFIER, f"{MODEL}_preprocess"))
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        assert b"nv_inference_count" in response.read()
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        assert port_in_use("127.0.0.1", port)


@pytest.mark.parametrize("n", [1, 5])
def test_http_matches_onnxruntime(http, reference, n):
    x = _images(n, seed=n)
    got = _http_infer(http, x)
    assert got.shape == (n, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(x), atol=1e-5)


@pytest.mark.parametrize("n", [1, 5])
def test_grpc_matches_onnxruntime(grpc, reference, n):
    x = _images(n, seed=10 + n)
    got = _grpc_infer(grpc, x)
    assert got.shape == (n, 2)
    np.testing.assert_allclose(got, reference(x), atol=1e-5)


def test_classification_extension_returns_label_names(http, reference):
    x = _images(3, seed=7)
    got = _http_infer(http, x, class_count=2)  # per image: [b"score:index:label", ...] best first
    assert got.shape == (3, 2)
    expected = reference(x)
    for row, probs in zip(got, expected, strict=True):
        entries = [entry.decode().split(":") for entry in row]
        assert [label for _, _, label in entries] == [
            ("normal", "pneumonia")[i] for i in np.argsort(-probs)
        ]
        assert float(entries[0][0]) == pytest.approx(probs.max(), abs=1e-5)


def test_bad_requests_are_400_and_the_server_keeps_serving(http, grpc, reference):
    cases = [
        (np.zeros((1, 1, 16, 16), np.float32), "FP32", "shape"),
        (np.zeros((33, 1, 32, 32), np.float32), "FP32", "batch"),
        (np.zeros((1, 1, 32, 32), np.float64), "FP64", "FP64"),
    ]
    for x, datatype, word in cases:
        with pytest.raises(InferenceServerException) as http_error:
            _http_infer(http, x, datatype=datatype)
        assert http_error.value.status() == "400", http_error.value
        assert word.lower() in http_error.value.message().lower()
        with pytest.raises(InferenceServerException) as grpc_error:
            _grpc_infer(grpc, x, datatype=datatype)
        assert grpc_error.value.status() == "StatusCode.INVALID_ARGUMENT", grpc_error.value
        assert word.lower() in grpc_error.value.message().lower()
    x = _images(2, seed=3)
    np.testing.assert_allclose(_http_infer(http, x), reference(x), atol=1e-5)
    np.testing.assert_allclose(_grpc_infer(grpc, x), reference(x), atol=1e-5)


def test_dynamic_batching_merges_concurrent_requests(server, reference):
    client = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        before = client.get_inference_statistics(CLASSIFIER, as_json=True)["model_stats"][0]
        inputs = [_images(1, seed=100 + i) for i in range(16)]
        results: list = [None] * 16
        done = threading.Semaphore(0)

        def callback(index, result, error):
            results[index] = error or result.as_numpy("probabilities")
            done.release()

        for i, x in enumerate(inputs):
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.async_infer(
                CLASSIFIER, [inp], lambda result, error, i=i: callback(i, result, error)
            )
        for _ in inputs:
            assert done.acquire(timeout=60)
        # Triton records an execution's statistics after it has sent the responses: wait
        deadline = time.monotonic() + 30
        while True:
            after = client.get_inference_statistics(CLASSIFIER, as_json=True)["model_stats"][0]
            inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
            if inferences >= 16 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        client.close()
    for x, got in zip(inputs, results, strict=True):
        np.testing.assert_allclose(got, reference(x), atol=1e-5)
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == 16
    assert executions < inferences, (executions, inferences)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_backend_stub_runs_this_python_and_its_packages(server):
    stubs = [
        pid
        for pid in children_of(server.pid)
        if os.readlink(f"/proc/{pid}/exe").endswith("triton_python_backend_stub")
    ]
    assert stubs, "no Python-backend stub process under tritonserver"
    libs = set()  # every stub: the classifier's loads onnxruntime, the preprocess one PIL
    for pid in stubs:
        maps = Path(f"/proc/{pid}/maps").read_text()
        libs |= {line.split()[-1] for line in maps.splitlines() if "/" in line}
    libpython = [lib for lib in libs if "/libpython3" in lib]
    libdir = os.path.realpath(sysconfig.get_config_var("LIBDIR"))
    assert libpython and all(os.path.realpath(lib).startswith(libdir) for lib in libpython), (
        libpython
    )
    site = os.path.realpath(sysconfig.get_paths()["platlib"])
    assert any("onnxruntime" in lib and os.path.realpath(lib).startswith(site) for lib in libs)


def test_busy_port_is_refused_by_name(server, tiny_classifier_repository):
    ports = free_ports() | {"grpc_port": server.grpc_port}
    other = TritonServer(tiny_classifier_repository, **ports)
    with pytest.raises(ServingError, match=f"grpc port {server.grpc_port}"):
        other.start()
    assert other.pid is None
