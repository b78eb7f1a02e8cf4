"""perf_analyzer as the side-by-side serving benchmark's load generator: fetched from the package
registry into a temporary medimg cache, run against a real tritonserver, its results read
back (throughput from its CSV, every request's latency from its profile export) and
checked against the server's own statistics::

    python -m pytest tests/integration/test_perf_analyzer.py -q
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving.perf.accounting import BenchError
from serving.perf.perf_analyzer import latencies_ms, locate, pa_level, write_input
from tests.fixtures.triton import MODEL, server_fixture

pytestmark = pytest.mark.timeout(300)
CLASSIFIER = f"{MODEL}_onnx"


def test_profile_export_with_raw_bytes_in_its_strings_is_read(tmp_path):
    """The export writes output tensors as raw bytes, quotes and backslashes included."""
    junk = b'"\\\xff\x00"timestamp":9,'
    export = (
        b'{"experiments":[{"experiment":{"mode":"concurrency","value":2},"requests":['
        b'{"timestamp":1000000,"request_inputs":{"input":null},"response_timestamps":[3500000],'
        b'"response_outputs":[{"probabilities":"' + junk + b'"}]},'
        b'{"timestamp":4000000,"request_inputs":{"input":null},"response_timestamps":[4250000],'
        b'"response_outputs":[{"probabilities":"' + junk + b'"}]}]}]}'
    )
    path = tmp_path / "profile.json"
    path.write_bytes(export)
    assert latencies_ms(path) == [2.5, 0.25]
    path.write_bytes(export.replace(b'"response_timestamps":[4250000]', b""))
    with pytest.raises(BenchError, match="2 request stamps but 1 response stamps"):
        latencies_ms(path)


def test_an_explicit_path_that_is_not_a_program_is_refused(tmp_path):
    with pytest.raises(BenchError, match="not an executable file"):
        locate(str(tmp_path / "perf_analyzer"))


server = server_fixture()


@pytest.fixture(scope="module")
def perf_analyzer(triton_cache_dir):
    return locate()  # fetched into the temporary cache (MEDIMG_CACHE_DIR)


def _inferences(url: str) -> int:
    with grpcclient.InferenceServerClient(url) as c:
        stats = c.get_inference_statistics(CLASSIFIER, as_json=True)
    return int(stats["model_stats"][0].get("inference_count", 0))


def test_a_level_counts_every_request_the_server_answered(
    server, perf_analyzer, tiny_classifier_spec, tmp_path
):
    spec = tiny_classifier_spec
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, spec.channels, spec.image_size, spec.image_size))
    data = write_input(images.astype(np.float32), spec.input_name, tmp_path / "input.json")
    args = argparse.Namespace(protocol="grpc", duration_s=1.5, shared_memory="none")
    before = _inferences(server.grpc_url)
    row = pa_level(perf_analyzer, server.grpc_url, CLASSIFIER, args, 2, data)
    answered = _inferences(server.grpc_url) - before

    # the export holds the requests of the measurement windows: all but the few in
    # flight at their edges
    assert 0.9 * answered <= row.requests <= answered and row.requests > 20
    assert row.concurrency == 2 and row.failed == 0
    # three windows of 0.5 s: the CSV's rate and the export's count tell the same story
    assert 0.6 < row.requests / (row.throughput * 1.5) < 1.6
    assert 0 < row.p50_ms <= row.p99_ms == pytest.approx(np.percentile(row.samples_ms, 99))
    assert row.extra["avg_batch"] >= 1 and row.extra["client_cpu_ms"] > 0
    assert row.extra["compute_infer_us"] > 0


def test_a_model_the_server_does_not_have_is_named_in_the_error(server, perf_analyzer, tmp_path):
    data = write_input(np.zeros((1, 1, 32, 32), np.float32), "input", tmp_path / "input.json")
    args = argparse.Namespace(protocol="grpc", duration_s=1.5, shared_memory="none")
    with pytest.raises(BenchError, match=r"model .no-such-model. at 127\.0\.0\.1"):
        pa_level(perf_analyzer, server.grpc_url, "no-such-model", args, 1, data)


def test_a_level_through_system_shared_memory_leaves_no_region_behind(
    server, perf_analyzer, tiny_classifier_spec, tmp_path
):
    """``--shared-memory system``: the same requests through regions perf_analyzer
    registers with the server, all of them answered, none left registered at the end."""
    spec = tiny_classifier_spec
    images = np.random.default_rng(1).normal(
        size=(4, spec.channels, spec.image_size, spec.image_size)
    )
    data = write_input(images.astype(np.float32), spec.input_name, tmp_path / "input.json")
    args = argparse.Namespace(protocol="grpc", duration_s=1.5, shared_memory="system")
    before = _inferences(server.grpc_url)
    row = pa_level(perf_analyzer, server.grpc_url, CLASSIFIER, args, 2, data)
    answered = _inferences(server.grpc_url) - before

    assert row.label.endswith("perf_analyzer, system shm")
    assert 0.9 * answered <= row.requests <= answered and row.requests > 20
    assert row.failed == 0 and row.extra["compute_infer_us"] > 0
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        assert c.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
