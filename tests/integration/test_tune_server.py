"""``medimg tune-server`` against real tritonservers over copies of the tiny model set: the
best config it writes serves, nothing is written when no trial fits the p99 budget (the
descent still walks towards it), and what its bench never reaches is not swept::

    python -m pytest tests/integration/test_tune_server.py -q
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from serving.clients.inputs import png_bytes
from serving.clients.sync import TritonClassifier
from serving.perf.bench import BenchOptions
from serving.perf.tune_server import current_knobs, sweep, write_best
from serving.repository.layout import read_config
from serving.server.process import TritonServer
from tests.fixtures.triton import MODEL, free_ports
from training.errors import ServingError

pytestmark = pytest.mark.timeout(300)


def test_tune_server_writes_the_best_config_that_then_serves(
    tiny_classifier_repository, tmp_path, triton_cache_dir, tiny_classifier_answer
) -> None:
    repo = tmp_path / "repository"
    shutil.copytree(tiny_classifier_repository, repo)
    bench = BenchOptions(
        protocol="grpc", model=MODEL, concurrency=(1, 4), duration_s=0.6, warmup_s=0.1
    )
    before, models = current_knobs(repo, MODEL)
    baseline, trials = sweep(repo, MODEL, bench, space={"max_queue_delay_us": (2000,)})
    assert baseline.knobs == before and before.max_queue_delay_us != 2000 and len(trials) == 2
    assert all(t.feasible and t.throughput > 0 for t in trials)
    pick = next(t for t in trials if t.knobs.max_queue_delay_us == 2000).knobs
    write_best(repo, MODEL, pick)
    for model_dir in (models.preprocess, models.classifier):  # the delay is the classifier's
        config = read_config(model_dir)
        delay = 2000 if model_dir == models.classifier else 0
        assert config.dynamic_batching.max_queue_delay_microseconds == delay
        assert (model_dir / "config.pbtxt.before-tune").is_file()
    assert current_knobs(repo, MODEL)[0] == pick
    image = np.full((40, 40), 90, dtype=np.uint8)
    with (
        TritonServer(repo, **free_ports()) as srv,
        TritonClassifier(srv.grpc_url, "grpc") as client,
    ):
        np.testing.assert_allclose(
            client.infer_bytes([png_bytes(image)])[0], tiny_classifier_answer(image), atol=1e-5
        )


def test_tune_server_leaves_the_repository_alone_when_nothing_fits(
    tiny_classifier_repository, tmp_path, triton_cache_dir
) -> None:
    from serving.perf.tune_server import check_result

    repo = tmp_path / "repository"
    shutil.copytree(tiny_classifier_repository, repo)
    snapshot = {p: p.read_bytes() for p in repo.rglob("config.pbtxt")}
    bench = BenchOptions(protocol="http", model=MODEL, concurrency=(1,), duration_s=0.5, warmup_s=0)
    baseline, trials = sweep(repo, MODEL, bench, space={}, p99_budget_ms=0.001)
    assert trials == [baseline] and not baseline.feasible
    with pytest.raises(ServingError, match="p99-budget-ms"):
        check_result(baseline, baseline, 0.03)
    assert {p: p.read_bytes() for p in repo.rglob("config.pbtxt")} == snapshot


def test_tune_server_walks_towards_the_p99_budget_while_nothing_fits(
    tiny_classifier_repository, tmp_path, triton_cache_dir
) -> None:
    """With every trial over the budget the descent still moves, to the lower p99: a 20 ms
    queue delay at concurrency 1 (each lone request waits it out) loses to none, and the
    next knob is tried from there; the error names the closest configuration."""
    from dataclasses import replace

    from serving.perf.tune_server import check_result

    repo = tmp_path / "repository"
    shutil.copytree(tiny_classifier_repository, repo)
    slow = replace(current_knobs(repo, MODEL)[0], max_queue_delay_us=20000)
    write_best(repo, MODEL, slow)
    bench = BenchOptions(
        protocol="grpc", model=f"{MODEL}_onnx", concurrency=(1,), duration_s=0.6, warmup_s=0.1
    )
    space = {"max_queue_delay_us": (0,), "preferred_batch_sizes": ((),)}
    baseline, trials = sweep(repo, MODEL, bench, space=space, p99_budget_ms=0.001)
    assert [t.knobs for t in trials] == [
        slow,
        replace(slow, max_queue_delay_us=0),
        replace(slow, max_queue_delay_us=0, preferred_batch_sizes=()),
    ]
    assert not any(t.feasible for t in trials)
    assert baseline.p99_low_ms >= 20 > trials[1].p99_low_ms
    best = min(trials, key=lambda t: t.p99_low_ms)
    with pytest.raises(ServingError, match=rf"lowest p99 was {best.p99_low_ms:.2f} ms \(delay 0us"):
        check_result(best, baseline, 0.1)


def test_tune_server_does_not_sweep_what_its_bench_never_reaches() -> None:
    from serving.perf.tune_server import default_space

    assert "preprocess_instances" in default_space(2, send="images")
    tensors = default_space(2, send="tensors")
    assert "preprocess_instances" not in tensors and tensors["instances"] == (1, 2)
    # instances before threads: one instance keeps "0" (every core) when it is tried
    order = list(tensors)
    assert order.index("instances") < order.index("intra_op_threads")
