"""Class activation maps through the real tritonserver: the ensemble's ``cam`` output
(image bytes in) equals the maps computed in process to 1e-4, a request for the
probabilities gets only them, ``write_overlays`` and ``medimg explain`` write one PNG per
image, a model exported before the maps is refused with the advice to re-export; and, on
the DenseNet-121 trained and exported by the session's pipeline fixtures, ``medimg
explain`` through Triton and ``--local`` agree::

    python -m pytest tests/integration/test_explain.py -q
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from serving.clients.inputs import collect_items
from serving.clients.sync import TritonClassifier
from serving.explain import LocalExplainer, ServerExplainer, write_overlays
from serving.repository.layout import write_model_set
from tests.fixtures.triton import MODEL, running_server, server_fixture, tiny_cam_network
from training.errors import ConfigError, ServingError
from training.model import ProbabilityHead
from training.registry import LoadedModel

pytestmark = pytest.mark.timeout(600)
OLD = "old-model"  # exported before the maps: no cam output


@pytest.fixture(scope="module")
def cam_and_old_repository(
    tmp_path_factory, tiny_cam_spec, tiny_cam_onnx, tiny_classifier_spec, tiny_classifier_onnx
):
    repo = tmp_path_factory.mktemp("explain_repository")
    write_model_set(repo, tiny_cam_spec, tiny_cam_onnx)
    write_model_set(repo, tiny_classifier_spec.with_fields(name=OLD), tiny_classifier_onnx)
    return repo


server = server_fixture("cam_and_old_repository")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Five PNGs of other sizes (one RGB), an .npy, and a text file posing as a PNG."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("explain_images")
    for i, shape in enumerate([(32, 32), (40, 56), (64, 64), (28, 28), (48, 48, 3)]):
        Image.fromarray(rng.integers(0, 255, size=shape, dtype=np.uint8)).save(root / f"img{i}.png")
    np.save(root / "arr.npy", rng.integers(0, 255, size=(36, 36), dtype=np.uint8))
    (root / "zz_bad.png").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def local(tiny_cam_spec) -> LocalExplainer:
    head = ProbabilityHead(tiny_cam_network(), False, tiny_cam_spec.temperature).eval()
    return LocalExplainer(LoadedModel(module=head, spec=tiny_cam_spec, uri="tiny"))


def _assert_same(served, local_answers, shape=(8, 8)) -> None:
    assert len(served) == len(local_answers)
    for s, here in zip(served, local_answers, strict=True):
        assert s.file == here.file and bool(s.error) == bool(here.error), (s.error, here.error)
        if s.error:
            continue
        assert (s.label, s.explained) == (here.label, here.explained)
        assert s.heatmap.shape == here.heatmap.shape == shape
        np.testing.assert_allclose(s.heatmap, here.heatmap, atol=1e-4, rtol=0)
        for name, p in s.probabilities.items():
            assert abs(p - here.probabilities[name]) <= 1e-4


@pytest.mark.parametrize(
    ("protocol", "client_preprocess"), [("http", False), ("grpc", False), ("grpc", True)]
)
def test_served_maps_equal_in_process(server, folder, local, protocol, client_preprocess):
    items, _ = collect_items([folder])
    url = server.http_url.removeprefix("http://") if protocol == "http" else server.grpc_url
    with TritonClassifier(url, protocol, MODEL, client_preprocess=client_preprocess) as client:
        assert client.contract.cam_name == "cam"
        explainer = ServerExplainer(client)
        for class_name in ("", "normal", "PNEUMONIA"):
            _assert_same(
                explainer.explain(items, class_name, batch_size=4), local.explain(items, class_name)
            )
        with pytest.raises(ConfigError, match="classes"):
            explainer.explain(items, "effusion")
        served = explainer.explain(items)
    assert sum(1 for e in served if e.error) == 1 and "zz_bad.png" in served[-1].error


def test_probabilities_alone_come_without_the_map(server, folder):
    png = (folder / "img0.png").read_bytes()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for asked in (["probabilities"], ["probabilities", "cam"]):
        inp = grpcclient.InferInput("image", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[png]], dtype=np.object_))
        outputs = [grpcclient.InferRequestedOutput(name) for name in asked]
        result = client.infer(MODEL, [inp], outputs=outputs)
        names = [o["name"] for o in result.get_response(as_json=True)["outputs"]]
        assert sorted(names) == sorted(asked)
    assert result.as_numpy("cam").shape == (1, 2, 8, 8)
    client.close()


def test_write_overlays_and_the_old_model(server, folder, tmp_path):
    items, _ = collect_items([folder])
    with TritonClassifier(server.grpc_url, "grpc", MODEL) as client:
        written = write_overlays(client, items, tmp_path / "out", class_name="pneumonia")
    ok = [e for e in written if not e.error]
    assert len(ok) == len(items) - 1
    for one in ok:
        assert one.path is not None and one.path.parent == tmp_path / "out"
        assert one.path.stat().st_mode & 0o777 == 0o600
        with Image.open(one.path) as png:
            assert png.format == "PNG" and png.size[0] > 300
        assert one.explained == "pneumonia" and one.method == "cam"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{Path(i.name).stem}.cam.png" for i in items if "bad" not in i.name
    )
    with TritonClassifier(server.grpc_url, "grpc", OLD) as client:
        assert client.contract.cam_name == ""
        with pytest.raises(ServingError, match=r"no class-activation-map output.*re-export"):
            write_overlays(client, items, tmp_path / "old")


def test_explain_command(server, folder, tmp_path, medimg_cmd):
    out = tmp_path / "explain"
    base = [*medimg_cmd, "explain", str(folder / "img0.png"), str(folder / "img2.png")]
    args = [*base, "--url", server.grpc_url, "--protocol", "grpc", "--model", MODEL]
    result = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("\tcam of " in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == ["img0.cam.png", "img2.cam.png"]
    refused = subprocess.run(
        [*args, "--gradcam", "relu"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1 and "--gradcam needs --local" in refused.stderr
    old = [*base, "--url", server.grpc_url, "--protocol", "grpc", "--model", OLD]
    refused = subprocess.run(old, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert refused.returncode == 1 and "re-export" in refused.stderr


def test_explain_through_triton_equals_local_on_the_trained_densenet(
    exported, trained, data_dir, tmp_path, tmp_path_factory, triton_cache_dir, medimg_cmd
):
    """The session's trained DenseNet-121, exported with its maps: the ensemble (bytes in)
    and ``--local`` (the MLflow model in process) give the same maps to 1e-4; the command
    writes a PNG per image both ways, and Grad-CAM in process."""
    from training.data import medmnist_arrays
    from training.registry import load_model

    cfg, outcome = trained
    loaded, repository, _ = exported
    raw, _ = medmnist_arrays("pneumoniamnist", "test", data_dir)
    for i in range(6):
        Image.fromarray(raw[i]).save(tmp_path / f"test{i}.png")
    items, _ = collect_items([tmp_path])
    log = tmp_path_factory.mktemp("explain_trained") / "server.log"
    local = LocalExplainer(load_model(cfg.tracking_uri, f"runs:/{outcome.run_id}/model"))
    with contextmanager(running_server)(repository, log) as srv:
        with TritonClassifier(srv.grpc_url, "grpc") as client:
            served = ServerExplainer(client).explain(items)
        side = loaded.spec.image_size // 32  # 1 x 1 at the fixture's 32 px
        _assert_same(served, local.explain(items), (side, side))
        common = ["--out", str(tmp_path / "out"), "--tracking-uri", cfg.tracking_uri]
        for how in (
            ["--url", srv.grpc_url, "--protocol", "grpc"],
            ["--local", f"{outcome.model_name}/{outcome.version}"],
            [
                "--local",
                f"{outcome.model_name}/{outcome.version}",
                "--gradcam",
                "features.denseblock3",
            ],
        ):
            args = [*medimg_cmd, "explain", str(tmp_path / "test0.png"), *common, *how]
            result = subprocess.run(args, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["test0.cam.png", "test0.gradcam-features.denseblock3.png"]


def test_label_and_triage_explain(server, folder, tmp_path, medimg_cmd):
    """``label --explain`` draws every flagged image (its predicted class); ``triage
    --explain`` every listed study with the map of the finding it was ranked by (the PNG
    ``write_overlays`` draws for that class), also for studies predicted otherwise."""
    items, _ = collect_items([folder])
    with TritonClassifier(server.grpc_url, "grpc", MODEL) as client:
        predicted = write_overlays(client, items, tmp_path / "predicted")
        of_finding = write_overlays(client, items, tmp_path / "finding", class_name="normal")
    assert len(predicted) == len(of_finding) == len(items)
    common = ["--url", server.grpc_url, "--protocol", "grpc", "--model", MODEL]
    labels, flagged_dir = tmp_path / "labels.csv", tmp_path / "flagged"
    label = [*medimg_cmd, "label", str(folder), *common, "--out", str(labels)]
    result = subprocess.run(
        [*label, "--review-below", "0.999", "--explain", str(flagged_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr  # zz_bad.png cannot be read
    flagged = [r.split(",")[0] for r in labels.read_text().splitlines()[1:] if ",true," in r]
    assert flagged and sorted(p.name for p in flagged_dir.iterdir()) == sorted(
        f"{Path(f).stem}.cam.png" for f in flagged
    )
    for f in flagged:
        name = f"{Path(f).stem}.cam.png"
        assert (flagged_dir / name).read_bytes() == (tmp_path / "predicted" / name).read_bytes()
    old = [*medimg_cmd, "label", str(folder), "--url", server.grpc_url, "--protocol", "grpc"]
    old += ["--model", OLD, "--out", str(tmp_path / "old.csv"), "--explain", str(tmp_path / "o")]
    result = subprocess.run(old, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--explain: model 'old-model'" in result.stderr
    assert "re-export" in result.stderr and not (tmp_path / "old.csv").exists()
    worklist = tmp_path / "worklist"
    triage = [*medimg_cmd, "triage", str(folder), *common, "--finding", "normal"]
    result = subprocess.run(
        [*triage, "--top", "4", "--explain", str(worklist)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    drawn = sorted(p.name for p in worklist.iterdir())
    assert len(drawn) == 4
    differs = 0
    for name in drawn:
        assert (worklist / name).read_bytes() == (tmp_path / "finding" / name).read_bytes()
        differs += (worklist / name).read_bytes() != (tmp_path / "predicted" / name).read_bytes()
    assert differs  # some listed study is predicted otherwise: its map is the finding's
