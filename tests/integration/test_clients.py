"""The client library and the client commands against a real tritonserver serving the tiny
model set: sync and asyncio clients over HTTP and gRPC, ``classify`` on directories and
``.npz`` splits, ``label``, ``triage`` with DICOM identifiers (``bench`` and ``tune-server``:
test_bench.py, test_tune_server.py)::

    python -m pytest tests/integration/test_clients.py -q
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image

from serving.clients.aio import AsyncTritonClassifier
from serving.clients.contract import client_url
from serving.clients.inputs import collect_items
from serving.clients.sync import TritonClassifier
from serving.server.process import TritonServer
from tests.fixtures.pipeline import SHARED_DATA, write_medmnist_npz
from tests.fixtures.triton import MODEL, free_ports, server_fixture
from training.data import medmnist_arrays
from training.errors import ServingError
from training.images import read_image

pytestmark = pytest.mark.timeout(300)
SECRET_PID, SECRET_STUDY, SECRET_ACCESSION = "MEDIMG-PID-7731", "1.2.826.0.1.3680043.99.1", "ACC-42"


served = server_fixture()


@pytest.fixture(scope="module")
def server(served):
    return {"http": served.http_url.removeprefix("http://"), "grpc": served.grpc_url}


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
    raw, _ = medmnist_arrays("pneumoniamnist", "test", data_dir)
    root = tmp_path_factory.mktemp("studies")
    (root / "nested").mkdir()
    for i in range(5):
        Image.fromarray(raw[i]).save(root / f"img{i}.png")
    np.save(root / "nested" / "arr.npy", raw[5])
    _dicom(root / "study.dcm", with_ids=True)
    _dicom(root / "nested" / "IM0001", with_ids=False)  # PACS-style name, DICM magic
    (root / "notes.txt").write_text("not an image, not picked up")
    # a full-size, non-square chest X-ray: cropped and reduced as PneumoniaMNIST was made
    sample = SHARED_DATA / "samples" / "00000001_000.png"
    full = np.asarray(Image.open(sample))[:, 40:440] if sample.is_file() else None
    if full is None:
        full = np.random.default_rng(0).integers(0, 255, (900, 700), dtype=np.uint8)
    Image.fromarray(np.ascontiguousarray(full)).save(root / "fullsize.png")
    return root


def test_sync_and_async_clients_agree_with_in_process(
    server, folder, tiny_classifier_answer
) -> None:
    items, errors = collect_items([folder])
    assert not errors and len(items) == 9  # 6 png + npy + 2 DICOM; notes.txt skipped
    want = {i.name: tiny_classifier_answer(read_image(i.path)) for i in items}
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


def _on(server, protocol: str) -> list[str]:
    """The options that point a client command at ``server`` over ``protocol``."""
    return ["--url", server[protocol], "--protocol", protocol]


def test_url_as_serve_prints_it(server, folder, medimg_cmd) -> None:
    """``medimg serve`` prints ``HTTP http://HOST:PORT``; ``--url`` takes that form too."""
    result = _run(medimg_cmd, "classify", folder, "--url", f"http://{server['http']}/")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 9
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
    extra = {
        "label": [folder],
        "triage": [folder, "--finding", "pneumonia"],
        "bench": ["--concurrency", "1", "--duration-s", "1", "--model", MODEL],
    }
    before = _inference_count(server)
    result = _run(medimg_cmd, command, *extra[command], "--out", out, "--url", server["http"])
    assert result.returncode == 1, result.stderr
    assert f"--out {out}: cannot write in" in result.stderr and "Traceback" not in result.stderr
    assert _inference_count(server) == before  # nothing was sent


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unknown_model_is_named_and_the_connection_closed(
    server, folder, medimg_cmd, protocol
) -> None:
    result = _run(medimg_cmd, "classify", folder, "--model", "nosuch", *_on(server, protocol))
    assert result.returncode == 1
    assert "'nosuch'" in result.stderr and "not found" in result.stderr
    assert "Unclosed" not in result.stderr, result.stderr  # aiohttp: a session left open


def test_classify_directory_as_csv_with_a_bad_file(server, folder, medimg_cmd, tmp_path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = _run(
        medimg_cmd, "classify", folder, bad, "--csv", "--batch-size", "4", *_on(server, "grpc")
    )
    assert result.returncode == 1
    assert "broken.png" in result.stderr and "1 of 10 input(s) failed" in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["file", "label", "probability", "prob_normal", "prob_pneumonia"]
    assert len(rows) == 9
    for row in rows:
        assert float(row["probability"]) == float(row[f"prob_{row['label']}"])
        assert float(row["prob_normal"]) + float(row["prob_pneumonia"]) == pytest.approx(
            1, abs=1e-5
        )


def test_label_npz_split(server, data_dir, medimg_cmd, tmp_path, tiny_classifier_answer) -> None:
    npz = data_dir / "pneumoniamnist.npz"
    out = tmp_path / "labels.csv"
    label = ["label", npz, "--split", "val", "--out", out, "--review-below", "0.6"]
    result = _run(medimg_cmd, *label, *_on(server, "http"))
    assert result.returncode == 0, result.stderr
    raw, _ = medmnist_arrays("pneumoniamnist", "val", data_dir)
    rows = list(csv.DictReader(out.open()))
    header = "file label probability needs_review prob_normal prob_pneumonia"
    assert list(rows[0]) == header.split()
    assert [r["file"] for r in rows] == [f"{npz}:val[{i}]" for i in range(len(raw))]
    for i in (0, len(raw) // 2, len(raw) - 1):
        np.testing.assert_allclose(
            [float(rows[i]["prob_normal"]), float(rows[i]["prob_pneumonia"])],
            tiny_classifier_answer(raw[i]),
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
    result = _run(medimg_cmd, "classify", npz, *_on(server, "grpc"))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 4  # still classified: a warning, not an error
    assert f"warning: {name} holds MedMNIST's breastmnist" in result.stderr
    assert "trained on pneumoniamnist" in result.stderr


def test_label_missing_split_and_bad_threshold(server, data_dir, medimg_cmd, tmp_path) -> None:
    out = tmp_path / "labels.csv"
    npz = data_dir / "pneumoniamnist.npz"
    result = _run(
        medimg_cmd, "label", npz, "--split", "holdout", "--out", out, *_on(server, "http")
    )
    assert result.returncode == 1 and "no split 'holdout'" in result.stderr
    result = _run(medimg_cmd, "label", npz, "--out", out, "--review-below", "1.5")
    assert result.returncode == 1 and "--review-below" in result.stderr


def test_triage_orders_by_finding_and_keeps_identifiers_in_the_worklist(
    server, folder, medimg_cmd, tmp_path, tiny_classifier_answer
) -> None:
    out = tmp_path / "worklist.csv"
    result = _run(
        medimg_cmd, "triage", folder, "--finding", "Pneumonia", "--out", out, *_on(server, "grpc")
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    probs = [float(r["prob_pneumonia"]) for r in rows]
    assert len(rows) == 9 and probs == sorted(probs, reverse=True)
    assert [int(r["rank"]) for r in rows] == list(range(1, 10))
    for r in rows:
        want = tiny_classifier_answer(read_image(r["file"]))[1]
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
    triage = ["triage", folder, "--finding", "effusion", "--out", missing]
    result = _run(medimg_cmd, *triage, *_on(server, "grpc"))
    assert result.returncode == 1 and "['normal', 'pneumonia']" in result.stderr
    assert not missing.exists()


def test_json_lines_and_text_agree(server, folder, medimg_cmd) -> None:
    png = folder / "img0.png"
    text = _run(medimg_cmd, "classify", png, "--url", server["http"])
    lines = _run(medimg_cmd, "classify", png, "--url", server["http"], "--json")
    assert text.returncode == lines.returncode == 0
    file, label, prob = text.stdout.strip().split("\t")
    record = json.loads(lines.stdout)
    assert (file, label) == (record["file"], record["label"])
    assert float(prob) == pytest.approx(record["probabilities"][label], abs=1e-4)


def test_threshold_decides_the_served_label(server, folder, medimg_cmd) -> None:
    """``--threshold P``: the finding wherever P(finding) >= P, whatever the arg-max; the
    tiny model's spec has no operating threshold, so without the flag: the arg-max."""
    pngs = sorted(folder.glob("img*.png"))
    plain = [
        json.loads(line)
        for line in _run(
            medimg_cmd, "classify", *pngs, *_on(server, "grpc"), "--json"
        ).stdout.splitlines()
    ]
    assert all("threshold" not in r for r in plain)
    for r in plain:
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    for cut, want in ((0.0, "pneumonia"), (1.0, "normal")):
        result = _run(
            medimg_cmd, "classify", *pngs, *_on(server, "grpc"), "--json", "--threshold", cut
        )
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert {r["label"] for r in records} == {want} and {r["threshold"] for r in records} == {
            cut
        }
    bad = _run(medimg_cmd, "classify", pngs[0], *_on(server, "grpc"), "--threshold", "2")
    assert bad.returncode == 1 and "--threshold: expected a probability" in bad.stderr


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

    server = TritonServer(tiny_classifier_repository, **free_ports())
    with server:
        preds, seconds = asyncio.run(go(server.grpc_url, server))
    assert len(preds) == 45 and all(p.error for p in preds)
    assert all(server.grpc_url in p.error for p in preds)
    assert seconds < 10, seconds


@pytest.mark.parametrize(
    ("status", "refused"),
    [
        ("400", True),
        ("413", True),
        ("StatusCode.INVALID_ARGUMENT", True),
        ("StatusCode.UNAVAILABLE", False),
        ("502", False),
        (None, False),
    ],
)
def test_only_refused_input_counts_as_the_items_fault(status, refused) -> None:
    """What decides between retrying a batch item by item and failing it whole."""
    from tritonclient.utils import InferenceServerException

    from serving.clients.session import serving_error
    from training.errors import RequestRefused

    error = serving_error("x", InferenceServerException("msg", status=status))
    assert isinstance(error, ServingError) and isinstance(error, RequestRefused) == refused
