"""The command line against real processes: ``medimg serve`` (tritonserver) and ``medimg classify``."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from serving.clients.sync import TritonClassifier
from tests.fixtures.pipeline import wait_for_output
from training.data import DataOptions, open_split

pytestmark = pytest.mark.timeout(600)
SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "samples"


@pytest.fixture(scope="module")
def served(exported, medimg_cmd, tmp_path_factory):
    """``medimg serve`` on free loopback ports, stopped by its PID."""
    from serving.server.network import find_free_port

    ports = [find_free_port() for _ in range(3)]
    _, repository, _ = exported
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                *medimg_cmd,
                "serve",
                "--repository",
                str(repository),
                "--http-port",
                str(ports[0]),
                "--grpc-port",
                str(ports[1]),
                "--metrics-port",
                str(ports[2]),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    wait_for_output(log, "Triton ready", proc, timeout=120)
    yield {
        "proc": proc,
        "http": f"127.0.0.1:{ports[0]}",
        "grpc": f"127.0.0.1:{ports[1]}",
        "log": log,
    }
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def images(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Real test-split images as PNG, JPEG (RGB, larger) and .npy, plus bad files."""
    from training.data import medmnist_arrays

    raw, _ = medmnist_arrays("pneumoniamnist", "test", data_dir)
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(raw[0]).save(folder / "grey.png")
    Image.fromarray(np.stack([raw[1]] * 3, axis=2)).resize((200, 150)).save(folder / "rgb.jpg")
    np.save(folder / "array.npy", raw[2])
    (folder / "notes.png").write_text("definitely not an image")
    files = {
        "png": folder / "grey.png",
        "jpg": folder / "rgb.jpg",
        "npy": folder / "array.npy",
        "bad": folder / "notes.png",
        "missing": folder / "missing.png",
    }
    if (SAMPLES / "00000001_000.png").exists():
        files["xray"] = SAMPLES / "00000001_000.png"
    if (SAMPLES / "chest_xray.dcm").exists():
        files["dicom"] = SAMPLES / "chest_xray.dcm"
    else:  # pydicom's own 16-bit test file
        import pydicom.data

        files["dicom"] = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    return files


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_probabilities_equal_onnxruntime(served, exported, data_dir, protocol) -> None:
    loaded, _, report = exported
    test = open_split(
        DataOptions("pneumoniamnist", str(data_dir)), "test", image_size=loaded.spec.image_size
    )
    x = test.model_input(loaded.spec.mean, loaded.spec.std)[:45]
    expected = ort.InferenceSession(str(report.onnx_path)).run(None, {"input": x})[0]
    with TritonClassifier(served[protocol], protocol) as client:
        assert (
            client.model == "pneumoniamnist-densenet121"
            and client.spec == loaded.spec.with_fields(cam_name="cam")
        )
        got = client.infer(x)  # 45 images: two requests (32 + 13)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("protocol", "preprocess"), [("http", []), ("grpc", []), ("grpc", ["--client-preprocess"])]
)
def test_classify_files_and_bad_files(
    served, images, exported, medimg_cmd, protocol, preprocess
) -> None:
    """Raw bytes to the ensemble (default) or tensors preprocessed here: the same answers,
    and a bad or missing file costs only its own line."""
    good = [images[k] for k in ("png", "jpg", "npy", "xray", "dicom") if k in images]
    args = [
        *medimg_cmd,
        "classify",
        *map(str, good[:1]),
        str(images["missing"]),
        str(images["bad"]),
        *map(str, good[1:]),
        "--url",
        served[protocol],
        "--protocol",
        protocol,
        "--json",
        *preprocess,
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "missing.png" in result.stderr and "notes.png" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(p) for p in good]
    for line in lines:
        assert line["label"] in ("normal", "pneumonia")
        assert set(line["probabilities"]) == {"normal", "pneumonia"}
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        # the trained model's operating threshold (in its spec) decides the label
        at_or_above = line["probabilities"]["pneumonia"] >= line["threshold"]
        assert at_or_above == (line["label"] == "pneumonia"), line
    import torch

    from training.images import read_image

    loaded, _, _ = exported
    for path, line in zip(good, lines, strict=True):  # against in-process PyTorch
        x = loaded.spec.preprocess(read_image(path)[None])
        with torch.no_grad():
            expected = loaded.module(torch.from_numpy(x)).numpy()[0]
        got = [line["probabilities"][name] for name in loaded.spec.class_names]
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=str(path))


def test_classify_text_output_matches_in_process(served, images, exported, medimg_cmd) -> None:
    loaded, _, report = exported
    result = subprocess.run(
        [*medimg_cmd, "classify", str(images["png"]), "--url", served["http"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    file, label, prob = result.stdout.strip().split("\t")
    from training.images import read_image

    x = loaded.spec.preprocess(read_image(images["png"])[None])
    expected = ort.InferenceSession(str(report.onnx_path)).run(None, {"input": x})[0][0]
    assert file == str(images["png"])
    assert label == loaded.spec.class_names[int(expected.argmax())]
    assert float(prob) == pytest.approx(float(expected.max()), abs=1e-4)


def test_classify_unreachable_server(images, medimg_cmd, free_port) -> None:
    url = f"127.0.0.1:{free_port()}"
    for protocol in ("http", "grpc"):
        result = subprocess.run(
            [*medimg_cmd, "classify", str(images["png"]), "--url", url, "--protocol", protocol],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0
        assert url in result.stderr


def test_serve_bad_repository(medimg_cmd, tmp_path, free_port) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for repo in (tmp_path / "absent", empty):
        started = time.monotonic()
        result = subprocess.run(
            [
                *medimg_cmd,
                "serve",
                "--repository",
                str(repo),
                "--http-port",
                str(free_port()),
                "--grpc-port",
                str(free_port()),
                "--metrics-port",
                str(free_port()),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0 and str(repo) in result.stderr
        assert time.monotonic() - started < 30


def test_serve_stops_cleanly_on_sigterm(served) -> None:
    proc = served["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
