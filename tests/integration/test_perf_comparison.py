"""The side-by-side serving benchmark's records (``serving.perf.comparison``): the CSV row
names the configuration that was measured, also for a reused repository, and an older CSV
gets the columns added since; the CPU split's zero-work copy does no model work::

    python -m pytest tests/integration/test_perf_comparison.py -q
"""

from __future__ import annotations

import csv

from serving.perf.comparison.cpu_split import copies
from serving.perf.comparison.model import config_summary, options_summary
from serving.perf.comparison.report import write_results
from serving.repository.layout import write_model_set
from serving.repository.model_config import RepositoryOptions


def test_a_reused_repository_is_described_like_one_written_here(
    tiny_classifier_spec, tiny_classifier_onnx, tmp_path
):
    for options in (
        RepositoryOptions(),
        RepositoryOptions(
            max_queue_delay_us=0,
            preferred_batch_sizes=(),
            instance_count=1,
            intra_op_threads=2,
            borrow_idle_cores=False,
            max_batch_size=16,
        ),
    ):
        repo = tmp_path / f"repo{options.instance_count}"
        models = write_model_set(repo, tiny_classifier_spec, tiny_classifier_onnx, options)
        assert config_summary(repo, models.classifier.name) == options_summary(options)


def test_the_csv_keeps_old_rows_and_fills_the_columns_added_since(tmp_path):
    old = "time,protocol,concurrency,duration_s,repository,served/inprocess\r\n"
    (tmp_path / "serving.csv").write_text(old + "2026-11-20 10:00:00,grpc,16,10.0,,0.870\r\n")
    report = {
        "time": "2026-12-01 04:00:00",
        "options": {
            "protocol": "grpc",
            "load_generator": "perf_analyzer",
            "shared_memory": "system",
            "concurrency": 16,
            "duration_s": 10.0,
        },
        "repository_options": "max_queue_delay_us=0 preferred=8",
        "ratios": {"served/inprocess": 0.8512},
        "load_average": [0.5, 2.0],
    }
    write_results(tmp_path, report, "text")
    with open(tmp_path / "serving.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["served/inprocess"] for r in rows] == ["0.870", "0.851"]
    assert [(r["load_generator"], r["shared_memory"]) for r in rows] == [
        ("medimg", "none"),
        ("perf_analyzer", "system"),
    ]
    assert rows[1]["repository"] == "max_queue_delay_us=0 preferred=8"
    assert not (tmp_path / "serving.csv.partial").exists()


def test_the_cpu_split_zero_work_copy_does_no_model_work(
    triton_cache_dir, tiny_classifier_repository, tmp_path
):
    """benchmarks/serving_cpu_split.py compares the classifier with a copy whose model.py
    returns zeros: served, the copy answers zeros, and the original is left as it was."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from serving.server.process import TritonServer
    from tests.fixtures.triton import free_ports

    name = "pneumoniamnist-densenet121_onnx"
    original = (tiny_classifier_repository / name / "1" / "model.py").read_bytes()
    variants = copies(tiny_classifier_repository, name, 2, tmp_path)
    assert (tiny_classifier_repository / name / "1" / "model.py").read_bytes() == original
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32), dtype=np.float32)
    answers = {}
    for variant, repository in variants.items():
        with TritonServer(repository, **free_ports()) as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            answers[variant] = client.infer(name, [inp]).as_numpy("probabilities")
    np.testing.assert_allclose(answers["exported"].sum(axis=1), 1.0, atol=1e-5)
    assert answers["zero-work"].shape == (3, 2) and not answers["zero-work"].any()
