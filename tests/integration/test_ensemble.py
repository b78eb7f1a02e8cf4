"""The ensemble on the real embedded tritonserver: raw PNG, JPEG and DICOM bytes in,
the same probabilities as in process; labels through the classification extension;
warmup at load; version policies; bad input answered with errors naming the problem
while the server keeps serving::

    python -m pytest tests/integration/test_ensemble.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serving.repository.layout import write_model_set
from serving.repository.model_config import RepositoryOptions
from tests.fixtures.requests import (
    dicom_without_pixels,
    encoded,
    in_process,
    infer_bytes,
    session_for,
)
from tests.fixtures.triton import MODEL, export_tiny_onnx, server_fixture

pytestmark = pytest.mark.timeout(300)
SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "samples"
LATEST, ALL = "versions-latest", "versions-all"


def sample_images() -> dict[str, bytes]:
    import pydicom.data

    images = {kind: encoded(kind) for kind in ("png", "jpeg", "dicom")}
    for name in ("CT_small.dcm", "MR_small.dcm"):  # pydicom's own test files: 16-bit, signed
        images[name] = Path(pydicom.data.get_testdata_file(name)).read_bytes()
    for path in sorted(SAMPLES.glob("*.png"))[:1] + sorted(SAMPLES.glob("*.dcm"))[:1]:
        images[path.name] = path.read_bytes()
    return images


@pytest.fixture(scope="module")
def onnx_v2(tmp_path_factory) -> Path:
    return export_tiny_onnx(tmp_path_factory.mktemp("onnx_v2") / "tiny_v2.onnx", seed=1)


@pytest.fixture(scope="module")
def versions_repository(tmp_path_factory, tiny_classifier_spec, tiny_classifier_onnx, onnx_v2):
    """The tiny model set, plus two models with versions 1 and 2: one served by the policy
    ``latest:1``, one by ``all``."""
    from dataclasses import replace

    repo = tmp_path_factory.mktemp("ensemble_repository")
    write_model_set(repo, tiny_classifier_spec, tiny_classifier_onnx)
    for name, policy in ((LATEST, "latest:1"), (ALL, "all")):
        spec = replace(tiny_classifier_spec, name=name)
        opts = RepositoryOptions(version_policy=policy, warmup=False)
        write_model_set(repo, spec, tiny_classifier_onnx, opts)  # version 1
        write_model_set(repo, spec, onnx_v2, opts)  # version 2
    return repo


server = server_fixture("versions_repository", extra_args=["--log-verbose=1"])  # to see warmup


@pytest.fixture(params=["http", "grpc"])
def client(request, server):
    if request.param == "http":
        c = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
        yield c, httpclient
    else:
        c = grpcclient.InferenceServerClient(url=server.grpc_url)
        yield c, grpcclient
    c.close()


def test_png_jpeg_dicom_bytes_match_in_process(client, tiny_classifier_spec, tiny_classifier_onnx):
    c, mod = client
    images = sample_images()
    batch = infer_bytes(c, mod, MODEL, list(images.values()))  # one request, every format
    for row, (name, data) in enumerate(images.items()):
        expected = in_process(tiny_classifier_spec, tiny_classifier_onnx, data)
        alone = infer_bytes(c, mod, MODEL, [data])[0]
        np.testing.assert_allclose(alone, expected, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(batch[row], expected, atol=1e-4, err_msg=name)


def test_classification_extension_returns_labels(
    server, tiny_classifier_spec, tiny_classifier_onnx
):
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    try:
        images = list(sample_images().values())[:3]
        got = infer_bytes(c, httpclient, MODEL, images, class_count=2)
    finally:
        c.close()
    assert got.shape == (3, 2)
    for row, data in zip(got, images, strict=True):
        probs = in_process(tiny_classifier_spec, tiny_classifier_onnx, data)
        entries = [entry.decode().split(":") for entry in row]  # "score:index:label"
        assert [label for _, _, label in entries] == [
            tiny_classifier_spec.class_names[i] for i in np.argsort(-probs)
        ]
        assert float(entries[0][0]) == pytest.approx(probs.max(), abs=1e-4)


def test_warmup_runs_at_load(server):
    """Triton logs (verbose) each warmup sample an instance runs before it is READY."""
    log = server.log_path.read_text(errors="replace")
    ran = [line for line in log.splitlines() if "is running warmup sample" in line]
    for model, sample in (
        (f"{MODEL}_onnx", "zeros_batch1"),
        (f"{MODEL}_preprocess", "sample_image"),
    ):
        assert any(f"model '{model}'" in line and f"'{sample}'" in line for line in ran), ran
    assert not [line for line in ran if LATEST in line or ALL in line]  # written with warmup=False


def test_version_policies_choose_what_serves(server, tiny_classifier_onnx, onnx_v2):
    c = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        x = np.random.default_rng(5).random((2, 1, 32, 32), dtype=np.float32)

        def run(model, version=""):
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return c.infer(model, [inp], model_version=version).as_numpy("probabilities")

        v1, v2 = session_for(tiny_classifier_onnx)(x), session_for(onnx_v2)(x)
        assert not np.allclose(v1, v2, atol=1e-3)  # the versions are told apart
        # latest:1 -> only version 2 is loaded, and it answers by default
        assert c.is_model_ready(f"{LATEST}_onnx", "2")
        assert not c.is_model_ready(f"{LATEST}_onnx", "1")
        np.testing.assert_allclose(run(f"{LATEST}_onnx"), v2, atol=1e-5)
        with pytest.raises(InferenceServerException):
            run(f"{LATEST}_onnx", "1")
        # all -> both, each with its own weights; the default is the newest
        assert c.is_model_ready(f"{ALL}_onnx", "1") and c.is_model_ready(f"{ALL}_onnx", "2")
        np.testing.assert_allclose(run(f"{ALL}_onnx", "1"), v1, atol=1e-5)
        np.testing.assert_allclose(run(f"{ALL}_onnx", "2"), v2, atol=1e-5)
        np.testing.assert_allclose(run(f"{ALL}_onnx"), v2, atol=1e-5)
    finally:
        c.close()


def _tensor(mod, name, array, datatype):
    inp = mod.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


def test_bad_input_is_refused_by_name_and_the_server_keeps_serving(
    client, tiny_classifier_spec, tiny_classifier_onnx
):
    c, mod = client
    png = encoded("png")
    obj = np.object_
    cases = [  # (model, input, words the error must contain)
        (MODEL, _tensor(mod, "image", np.array([[b"not an image"]], obj), "BYTES"), ["image[0]"]),
        (MODEL, _tensor(mod, "image", np.array([[png[:60]]], obj), "BYTES"), ["image[0]"]),
        (
            MODEL,
            _tensor(mod, "image", np.array([[dicom_without_pixels()]], obj), "BYTES"),
            ["pixel"],
        ),
        (MODEL, _tensor(mod, "image", np.array([[b""]], obj), "BYTES"), ["empty"]),
        (MODEL, _tensor(mod, "image", np.zeros((1, 1), np.float32), "FP32"), ["image", "FP32"]),
        (MODEL, _tensor(mod, "image", np.array([[png]] * 33, obj), "BYTES"), ["batch", "32"]),
        (
            f"{MODEL}_onnx",
            _tensor(mod, "input", np.zeros((1, 1, 16, 16), np.float32), "FP32"),
            ["shape", "16"],
        ),
        (
            f"{MODEL}_onnx",
            _tensor(mod, "input", np.zeros((1, 1, 32, 32), np.float64), "FP64"),
            ["FP64"],
        ),
    ]
    for model, inp, words in cases:
        with pytest.raises(InferenceServerException) as error:
            c.infer(model, [inp])
        status = str(error.value.status())
        assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (model, words, error.value)
        for word in words:
            assert word.lower() in error.value.message().lower(), (words, error.value.message())
    with pytest.raises(InferenceServerException):  # an empty request: no inputs at all
        c.infer(MODEL, [])
    got = infer_bytes(c, mod, MODEL, [png])[0]
    np.testing.assert_allclose(
        got, in_process(tiny_classifier_spec, tiny_classifier_onnx, png), atol=1e-4
    )
