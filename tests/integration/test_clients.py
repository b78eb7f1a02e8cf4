"""The client library and the client commands against a real tritonserver serving the tiny
model set: sync and asyncio clients over HTTP and gRPC, ``classify`` on directories and
``.npz`` splits, ``label``, ``triage`` with DICOM identifiers, ``bench`` and ``tune-server``::

    python -m pytest tests/test_clients.py -q
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from PIL import Image

from serving.clients.aio import AsyncTritonClassifier
from serving.clients.inputs import collect_items, png_bytes
from serving.clients.sync import TritonClassifier, client_url
from serving.perf.bench import BenchOptions
from serving.perf.tune_server import current_knobs, sweep, write_best
from serving.repository.layout import read_config
from serving.server.process import TritonServer
from tests.fixtures.pipeline import write_medmnist_npz
from tests.fixtures.triton import MODEL, _ports
from training.data import load_split
from training.errors import ServingError
from training.images import read_image

pytestmark = pytest.mark.timeout(300)
SECRET_PID, SECRET_STUDY, SECRET_ACCESSION = "MEDIMG-PID-7731", "1.2.826.0.1.3680043.99.1", "ACC-42"


@pytest.fixture(scope="module")
def server(triton_cache_dir, tiny_classifier_repository):
    with TritonServer(tiny_classifier_repository, **_ports()) as srv:
        yield {"http": srv.http_url.removeprefix("http://"), "grpc": srv.grpc_url}


@pytest.fixture(scope="module")
def expected(tiny_classifier_spec, tiny_classifier_onnx):
    """What the tiny model gives in this process for an image (uint8, as read)."""
    session = ort.InferenceSession(str(tiny_classifier_onnx), providers=["CPUExecutionProvider"])
    return lambda image: session.run(None, {"input": tiny_classifier_spec.preprocess(image[None])})[
        0
    ][0]


def _dicom(path: Path, *, with_ids: bool) -> Path:
    import pydicom
    import pydicom.data

    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    if with_ids:
        ds.PatientID, ds.StudyInstanceUID, ds.AccessionNumber = (
            SECRET_PID,
            SECRET_STUDY,
            SECRET_ACCESSION,
        )
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory, data_dir) -> Path:
    """PNG and .npy images from the test split, a DICOM study with identifiers (one with a
    .dcm name, one without a suffix), a nested folder, and a text file posing as a PNG."""
    raw, _ = load_split("pneumoniamnist", "test", data_dir)
    root = tmp_path_factory.mktemp("studies")
    (root / "nested").mkdir()
    for i in range(5):
        Image.fromarray(raw[i]).save(root / f"img{i}.png")
    np.save(root / "nested" / "arr.npy", raw[5])
    _dicom(root / "study.dcm", with_ids=True)
    _dicom(root / "nested" / "IM0001", with_ids=False)  # PACS-style name, DICM magic
    (root / "notes.txt").write_text("not an image, not picked up")
    return root


def test_sync_and_async_clients_agree_with_in_process(server, folder, expected) -> None:
    items, errors = collect_items([folder])
    assert not errors and len(items) == 8  # 5 png + npy + 2 DICOM; notes.txt skipped
    want = {i.name: expected(read_image(i.path)) for i in items}
    for protocol in ("http", "grpc"):
        with TritonClassifier(server[protocol], protocol) as client:
            sync = list(client.classify_items(items, batch_size=3))

        async def go(protocol=protocol, preprocess=False):
            async with AsyncTritonClassifier(
                server[protocol], protocol, client_preprocess=preprocess
            ) as client:
                return await client.classify_all(items, batch_size=3, in_flight=3)

        for preds in (sync, asyncio.run(go()), asyncio.run(go(preprocess=True))):
            assert [p.file for p in preds] == [i.name for i in items]
            for p in preds:
                got = [p.probabilities[n] for n in ("normal", "pneumonia")]
                np.testing.assert_allclose(got, want[p.file], atol=1e-5, err_msg=p.file)


def test_async_client_unreachable_server_names_it(free_port) -> None:
    url = f"127.0.0.1:{free_port()}"

    async def go():
        async with AsyncTritonClassifier(url, "grpc", timeout_s=5):
            pass

    with pytest.raises(ServingError, match=url):
        asyncio.run(go())


def _run(medimg_cmd, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*medimg_cmd, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_url_as_serve_prints_it(server, folder, medimg_cmd) -> None:
    """``medimg serve`` prints ``HTTP http://HOST:PORT``; ``--url`` takes that form too."""
    result = _run(medimg_cmd, "classify", folder, "--url", f"http://{server['http']}/")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 8
    assert client_url("", "grpc") == "127.0.0.1:8001"
    for url, protocol in [("http://h:1", "grpc"), ("https://h:1", "http"), ("h:1/v2", "http")]:
        with pytest.raises(ServingError, match=f"--url for {protocol}: expected HOST:PORT"):
            client_url(url, protocol)


def _inference_count(server) -> int:
    stats = httpclient.InferenceServerClient(server["http"]).get_inference_statistics(MODEL)
    return int(stats["model_stats"][0]["inference_count"])


@pytest.mark.parametrize("command", ["label", "triage", "bench"])
def test_an_unwritable_out_fails_before_any_request(
    server, folder, medimg_cmd, tmp_path, command
) -> None:
    """A long labelling run must not end in a traceback that loses its results: the place
    ``--out`` names is checked first (root writes anywhere, so a file stands in the way)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / ("results" if command == "bench" else "out.csv")
    extra = {"label": [folder], "triage": [folder, "--finding", "pneumonia"],
             "bench": ["--concurrency", "1", "--duration-s", "1", "--model", MODEL]}  # fmt: skip
    before = _inference_count(server)
    result = _run(medimg_cmd, command, *extra[command], "--out", out, "--url", server["http"])
    assert result.returncode == 1, result.stderr
    assert f"--out {out}: cannot write in" in result.stderr and "Traceback" not in result.stderr
    assert _inference_count(server) == before  # nothing was sent


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unknown_model_is_named_and_the_connection_closed(
    server, folder, medimg_cmd, protocol
) -> None:
    result = _run(medimg_cmd, "classify", folder, "--model", "nosuch",
                  "--url", server[protocol], "--protocol", protocol)  # fmt: skip
    assert result.returncode == 1
    assert "'nosuch'" in result.stderr and "not found" in result.stderr
    assert "Unclosed" not in result.stderr, result.stderr  # aiohttp: a session left open


def test_classify_directory_as_csv_with_a_bad_file(server, folder, medimg_cmd, tmp_path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = _run(medimg_cmd, "classify", folder, bad, "--url", server["grpc"],
                  "--protocol", "grpc", "--csv", "--batch-size", "4")  # fmt: skip
    assert result.returncode == 1
    assert "broken.png" in result.stderr and "1 of 9 input(s) failed" in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["file", "label", "probability", "prob_normal", "prob_pneumonia"]
    assert len(rows) == 8
    for row in rows:
        assert float(row["probability"]) == float(row[f"prob_{row['label']}"])
        assert float(row["prob_normal"]) + float(row["prob_pneumonia"]) == pytest.approx(
            1, abs=1e-5
        )


def test_label_npz_split(server, data_dir, medimg_cmd, tmp_path, expected) -> None:
    npz = data_dir / "pneumoniamnist.npz"
    out = tmp_path / "labels.csv"
    result = _run(medimg_cmd, "label", npz, "--split", "val", "--out", out,
                  "--review-below", "0.6", "--url", server["http"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    raw, _ = load_split("pneumoniamnist", "val", data_dir)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == [
        "file", "label", "probability", "needs_review", "prob_normal", "prob_pneumonia"
    ]  # fmt: skip
    assert [r["file"] for r in rows] == [f"{npz}:val[{i}]" for i in range(len(raw))]
    for i in (0, len(raw) // 2, len(raw) - 1):
        np.testing.assert_allclose(
            [float(rows[i]["prob_normal"]), float(rows[i]["prob_pneumonia"])],
            expected(raw[i]),
            atol=1e-5,
        )
    for r in rows:
        assert r["needs_review"] == ("true" if float(r["probability"]) < 0.6 else "false")
    review = sum(r["needs_review"] == "true" for r in rows)
    assert f"needs review (p < 0.60): {review}" in result.stdout
    for name in ("normal", "pneumonia"):
        count = sum(r["label"] == name for r in rows)
        assert any(line.split() == [name, str(count)] for line in result.stdout.splitlines())
    assert "warning" not in result.stderr  # the model's own data set


@pytest.mark.parametrize("name", ["breastmnist.npz", "breastmnist_64.npz"])
def test_an_npz_of_another_medmnist_set_is_flagged(server, medimg_cmd, tmp_path, name) -> None:
    npz = write_medmnist_npz(tmp_path / name, {"test": 4})
    result = _run(medimg_cmd, "classify", npz, "--url", server["grpc"], "--protocol", "grpc")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 4  # still classified: a warning, not an error
    assert f"warning: {name} holds MedMNIST's breastmnist" in result.stderr
    assert "trained on pneumoniamnist" in result.stderr


def test_label_missing_split_and_bad_threshold(server, data_dir, medimg_cmd, tmp_path) -> None:
    out = tmp_path / "labels.csv"
    npz = data_dir / "pneumoniamnist.npz"
    result = _run(medimg_cmd, "label", npz, "--split", "holdout", "--out", out,
                  "--url", server["http"])  # fmt: skip
    assert result.returncode == 1 and "no split 'holdout'" in result.stderr
    result = _run(medimg_cmd, "label", npz, "--out", out, "--review-below", "1.5")
    assert result.returncode == 1 and "--review-below" in result.stderr


def test_triage_orders_by_finding_and_keeps_identifiers_in_the_worklist(
    server, folder, medimg_cmd, tmp_path, expected
) -> None:
    out = tmp_path / "worklist.csv"
    result = _run(medimg_cmd, "triage", folder, "--finding", "Pneumonia", "--out", out,
                  "--url", server["grpc"], "--protocol", "grpc")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    probs = [float(r["prob_pneumonia"]) for r in rows]
    assert len(rows) == 8 and probs == sorted(probs, reverse=True)
    assert [int(r["rank"]) for r in rows] == list(range(1, 9))
    for r in rows:
        want = expected(read_image(r["file"]))[1]
        assert float(r["prob_pneumonia"]) == pytest.approx(float(want), abs=1e-5)
    study = next(r for r in rows if r["file"].endswith("study.dcm"))
    assert (study["PatientID"], study["StudyInstanceUID"], study["AccessionNumber"]) == (
        SECRET_PID,
        SECRET_STUDY,
        SECRET_ACCESSION,
    )
    assert next(r for r in rows if r["file"].endswith("IM0001"))["PatientID"] != SECRET_PID
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    for secret in (SECRET_PID, SECRET_STUDY, SECRET_ACCESSION):  # worklist only, never logged
        assert secret not in result.stdout + result.stderr

    missing = tmp_path / "none.csv"
    result = _run(medimg_cmd, "triage", folder, "--finding", "effusion", "--out", missing,
                  "--url", server["grpc"], "--protocol", "grpc")  # fmt: skip
    assert result.returncode == 1 and "['normal', 'pneumonia']" in result.stderr
    assert not missing.exists()


def test_bench_writes_csv_and_curve(server, medimg_cmd, tmp_path) -> None:
    result = _run(medimg_cmd, "bench", "--model", f"{MODEL}_onnx", "--url", server["grpc"],
                  "--protocol", "grpc", "--concurrency", "1,4", "--duration-s", "1.5",
                  "--warmup-s", "0.3", "--out", tmp_path)  # fmt: skip
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
    split = sum(float(rows[0][f"server_{k}_us"]) for k in ("queue", "compute_input",
                                                            "compute_infer", "compute_output"))  # fmt: skip
    assert split / 1e3 < float(rows[0]["p99_ms"])
    png = tmp_path / f"bench-{MODEL}_onnx-grpc-b1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_server_writes_the_best_config_that_then_serves(
    tiny_classifier_repository, tmp_path, triton_cache_dir, expected
) -> None:
    repo = tmp_path / "repository"
    shutil.copytree(tiny_classifier_repository, repo)
    bench = BenchOptions(protocol="grpc", model=MODEL, concurrency=(1, 4), duration_s=0.6,
                         warmup_s=0.1)  # fmt: skip
    before, models = current_knobs(repo, MODEL)
    baseline, trials = sweep(repo, MODEL, bench, space={"max_queue_delay_us": (2000,)})
    assert baseline.knobs == before and before.max_queue_delay_us != 2000 and len(trials) == 2
    assert all(t.feasible and t.throughput > 0 for t in trials)
    pick = next(t for t in trials if t.knobs.max_queue_delay_us == 2000).knobs
    write_best(repo, MODEL, pick)
    for name in models[1:]:  # the delay is the classifier's; preprocess keeps none
        config = read_config(repo / name)
        delay = 2000 if name == models[2] else 0
        assert config.dynamic_batching.max_queue_delay_microseconds == delay
        assert (repo / name / "config.pbtxt.before-tune").is_file()
    assert current_knobs(repo, MODEL)[0] == pick
    image = np.full((40, 40), 90, dtype=np.uint8)
    with TritonServer(repo, **_ports()) as srv, TritonClassifier(srv.grpc_url, "grpc") as client:
        np.testing.assert_allclose(
            client.infer_bytes([png_bytes(image)])[0], expected(image), atol=1e-5
        )


def test_tune_server_leaves_the_repository_alone_when_nothing_fits(
    tiny_classifier_repository, tmp_path, triton_cache_dir
) -> None:
    from serving.perf.tune_server import check_result

    repo = tmp_path / "repository"
    shutil.copytree(tiny_classifier_repository, repo)
    snapshot = {p: p.read_bytes() for p in repo.rglob("config.pbtxt")}
    bench = BenchOptions(protocol="http", model=MODEL, concurrency=(1,), duration_s=0.5,
                         warmup_s=0)  # fmt: skip
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
    bench = BenchOptions(protocol="grpc", model=f"{MODEL}_onnx", concurrency=(1,),
                         duration_s=0.6, warmup_s=0.1)  # fmt: skip
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


def test_json_lines_and_text_agree(server, folder, medimg_cmd) -> None:
    png = folder / "img0.png"
    text = _run(medimg_cmd, "classify", png, "--url", server["http"])
    lines = _run(medimg_cmd, "classify", png, "--url", server["http"], "--json")
    assert text.returncode == lines.returncode == 0
    file, label, prob = text.stdout.strip().split("\t")
    record = json.loads(lines.stdout)
    assert (file, label) == (record["file"], record["label"])
    assert float(prob) == pytest.approx(record["probabilities"][label], abs=1e-4)


def test_bench_through_shared_memory_cleans_up(server) -> None:
    import tritonclient.grpc as grpcclient

    from serving.perf.bench import run_bench

    opts = BenchOptions(url=server["grpc"], protocol="grpc", model=f"{MODEL}_onnx",
                        concurrency=(1, 3), duration_s=0.7, warmup_s=0.1, shared_memory=True)  # fmt: skip
    results = run_bench(opts)
    assert [r.failed for r in results] == [0, 0] and all(r.requests > 5 for r in results)
    status = grpcclient.InferenceServerClient(server["grpc"]).get_system_shared_memory_status()
    assert not status.regions  # every region unregistered
    with pytest.raises(Exception, match="needs a tensor model"):
        run_bench(BenchOptions(url=server["grpc"], protocol="grpc", model=MODEL,
                               concurrency=(1,), duration_s=0.2, shared_memory=True))  # fmt: skip


def test_a_server_gone_mid_run_fails_every_item_without_per_item_retries(
    tiny_classifier_repository, folder, triton_cache_dir
) -> None:
    """A refused batch (a bad file) is retried item by item; a dead server is not: every
    item fails at once with the connection error."""
    items = collect_items([folder])[0] * 5

    async def go(url: str, server: TritonServer):
        async with AsyncTritonClassifier(url, "grpc", timeout_s=20) as client:
            server.stop()
            started = time.monotonic()
            preds = await client.classify_all(items, batch_size=4)
            return preds, time.monotonic() - started

    server = TritonServer(tiny_classifier_repository, **_ports())
    with server:
        preds, seconds = asyncio.run(go(server.grpc_url, server))
    assert len(preds) == 40 and all(p.error for p in preds)
    assert all(server.grpc_url in p.error for p in preds)
    assert seconds < 10, seconds


@pytest.mark.parametrize(
    ("status", "refused"),
    [("400", True), ("413", True), ("StatusCode.INVALID_ARGUMENT", True),
     ("StatusCode.UNAVAILABLE", False), ("502", False), (None, False)],
)  # fmt: skip
def test_only_refused_input_counts_as_the_items_fault(status, refused) -> None:
    """What decides between retrying a batch item by item and failing it whole."""
    from tritonclient.utils import InferenceServerException

    from serving.clients.sync import serving_error
    from training.errors import RequestRefused

    error = serving_error("x", InferenceServerException("msg", status=status))
    assert isinstance(error, ServingError) and isinstance(error, RequestRefused) == refused
