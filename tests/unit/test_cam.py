"""Class activation maps: CamHead's outputs and identity, the ONNX export of both outputs,
the configs and the Python backend that serve them, Grad-CAM through pytorch-grad-cam, and
the model-randomisation sanity check (Adebayo et al. 2018) on a DenseNet-121 trained here
for a few seconds on images whose class is a bright blob::

    python -m pytest tests/unit/test_cam.py -q -s   # -s prints the sanity check's numbers
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import json_format

from serving.clients.contract import ModelContract
from serving.explain.overlay import upsample
from serving.export.onnx import CAM_PARITY_ATOL, PARITY_ATOL, export_onnx, parity_by_output
from serving.repository.layout import read_config
from serving.repository.model_config import RepositoryOptions, classifier_config, ensemble_config
from tests.fixtures.triton import FakeRequest, fake_pb_utils, tiny_cam_network, tiny_module
from training.cam import CamHead, GradCamNetwork, class_activation_maps, grad_cam
from training.model import ProbabilityHead, build_model

BACKEND_MODEL = Path(__file__).resolve().parents[2] / "serving" / "triton_backend" / "model.py"


@pytest.mark.parametrize(("multi_label", "temperature"), [(False, (1.7,)), (True, (0.5, 2.0, 1.3))])
def test_cam_head_shapes_identity_and_probabilities(multi_label, temperature) -> None:
    torch.manual_seed(0)
    network = build_model(1, 3).eval()
    head = ProbabilityHead(network, multi_label, temperature).eval()
    cam_head = CamHead.from_head(head)
    assert cam_head is not None
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        probs, cam = cam_head(x)
        t = torch.tensor(temperature).reshape(1, -1)
        logits = network(x) / t
        assert torch.equal(probs, head(x))  # the same operations: bit for bit
        identity = cam.mean(dim=(2, 3)) + network.classifier.bias / t
    assert cam.shape == (3, 3, 2, 2)  # DenseNet-121: 64 px / 32
    assert float((identity - logits).abs().max()) < 1e-5


def test_cam_head_needs_a_densenet_shaped_network() -> None:
    assert CamHead.from_head(tiny_module()) is None
    assert CamHead.from_head(ProbabilityHead(tiny_module(), False)) is None
    with pytest.raises(Exception, match="features"):
        CamHead(tiny_module(), False)


def test_upsample_is_torch_bilinear() -> None:
    rng = np.random.default_rng(0)
    for shape, size in (((2, 2), (64, 64)), ((7, 7), (224, 300)), ((3, 5), (7, 4))):
        heat = rng.normal(size=shape).astype(np.float32)
        expected = F.interpolate(
            torch.from_numpy(heat)[None, None], size=size, mode="bilinear", align_corners=False
        )[0, 0].numpy()
        np.testing.assert_allclose(upsample(heat, *size), expected, atol=1e-6)


def test_onnx_export_has_both_outputs_and_parity(tiny_cam_spec, tmp_path) -> None:
    import onnx

    head = CamHead(tiny_cam_network(), False, tiny_cam_spec.temperature).eval()
    path = export_onnx(head, tiny_cam_spec, tmp_path / "model.onnx", max_batch_size=8)
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["probabilities", "cam"]
    cam_dims = graph.output[1].type.tensor_type.shape.dim
    assert cam_dims[0].dim_param and [d.dim_value for d in cam_dims[1:]] == [2, 8, 8]
    x = np.random.default_rng(0).normal(size=(8, 1, 32, 32)).astype(np.float32)
    probs_diff, cam_diff = parity_by_output(head, path, x, (1, 3, 8))
    assert probs_diff <= PARITY_ATOL and cam_diff <= CAM_PARITY_ATOL
    with torch.no_grad():  # a map of other weights is caught
        head.model.classifier.weight[1] += 0.1
    assert parity_by_output(head, path, x, (8,))[1] > CAM_PARITY_ATOL


def test_configs_declare_the_cam_only_when_the_spec_names_it(
    tiny_classifier_spec, tiny_cam_spec
) -> None:
    opts = RepositoryOptions()
    assert [o.name for o in classifier_config(tiny_classifier_spec, opts).output] == [
        "probabilities"
    ]
    old = ensemble_config(tiny_classifier_spec, opts)
    assert [o.name for o in old.output] == ["probabilities"]
    config = classifier_config(tiny_cam_spec, opts)
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("probabilities", [2]),
        ("cam", [2, -1, -1]),
    ]
    ensemble = ensemble_config(tiny_cam_spec, opts)
    assert [o.name for o in ensemble.output] == ["probabilities", "cam"]
    assert dict(ensemble.ensemble_scheduling.step[1].output_map) == {
        "probabilities": "probabilities",
        "cam": "cam",
    }
    as_json = json_format.MessageToDict(ensemble, preserving_proto_field_name=True)
    assert ModelContract.from_config("m", as_json).cam_name == "cam"
    old_json = json_format.MessageToDict(old, preserving_proto_field_name=True)
    assert ModelContract.from_config("m", old_json).cam_name == ""
    # a spec naming a map that the served config does not declare: no map
    del as_json["output"][1]
    assert ModelContract.from_config("m", as_json).cam_name == ""


def test_backend_computes_only_the_outputs_asked_for(tiny_cam_repository, monkeypatch) -> None:
    """One ORT run per batch for the union of the outputs its requests asked for; each
    request gets its own; a request that names none gets all."""
    pb = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    module_spec = importlib.util.spec_from_file_location("medimg_backend_cam", BACKEND_MODEL)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    model_dir = tiny_cam_repository / "pneumoniamnist-densenet121_onnx"
    proto = read_config(model_dir)
    proto.parameters["borrow_idle_cores"].string_value = "0"
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json_format.MessageToJson(proto, preserving_proto_field_name=True),
            "model_repository": str(model_dir),
            "model_version": "1",
        }
    )
    runs, session = [], model.session

    class Recording:
        def run(self, names, feeds):
            runs.append(list(names))
            return session.run(names, feeds)

    model.session = Recording()
    x = np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)
    reference = session.run(None, {"input": x})
    only = model.execute([FakeRequest({"input": pb.Tensor("input", x)}, ("probabilities",))])
    assert runs == [["probabilities"]]
    assert [t.name for t in only[0].output_tensors] == ["probabilities"]
    mixed = model.execute(
        [
            FakeRequest({"input": pb.Tensor("input", x[:1])}, ("probabilities",)),
            FakeRequest({"input": pb.Tensor("input", x[1:])}, ("probabilities", "cam")),
            {"input": pb.Tensor("input", x[:2])},  # names no output: all of them
        ]
    )
    assert runs[1] == ["probabilities", "cam"]
    assert [[t.name for t in r.output_tensors] for r in mixed] == [
        ["probabilities"],
        ["probabilities", "cam"],
        ["probabilities", "cam"],
    ]
    np.testing.assert_allclose(mixed[1].output_tensors[1].as_numpy(), reference[1][1:], atol=1e-6)
    np.testing.assert_allclose(mixed[2].output_tensors[0].as_numpy(), reference[0][:2], atol=1e-6)
    model.finalize()


def test_grad_cam_layers_and_the_in_place_relu() -> None:
    """On GradCamNetwork (no in-place ReLU), Grad-CAM of ``relu`` is the CAM rectified and
    scaled to [0, 1]; deeper layers work; on torchvision's own module, ``features.norm5``
    gives another, wrong map (its in-place ReLU rewrites the activation the library kept)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    network = build_model(1, 2).eval()
    x = np.random.default_rng(0).normal(size=(2, 1, 96, 96)).astype(np.float32)
    with torch.no_grad():
        assert torch.allclose(
            GradCamNetwork(network)(torch.from_numpy(x)), network(torch.from_numpy(x))
        )
    _, cams = class_activation_maps(CamHead(network, False), x)
    final = grad_cam(network, x, "relu", [1, 0])
    for i, k in enumerate((1, 0)):
        expected = upsample(np.maximum(cams[i, k], 0), 96, 96)
        expected = (expected - expected.min()) / (expected.max() - expected.min())
        assert final[i].shape == (96, 96)
        assert np.corrcoef(final[i].ravel(), expected.ravel())[0, 1] > 0.99
    for layer in ("features.denseblock3", "features.norm5"):
        heat = grad_cam(network, x, layer, [1, 1])
        assert heat.shape == (2, 96, 96) and np.isfinite(heat).all() and heat.max() <= 1.0
    with GradCAM(model=network, target_layers=[network.features.norm5]) as cam:
        raw = cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(1)] * 2)
    assert np.abs(raw - grad_cam(network, x, "features.norm5", [1, 1])).max() > 0.05
    with pytest.raises(Exception, match="no such layer"):
        grad_cam(network, x, "features.denseblock9", [1, 1])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(v.ravel())).astype(float) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def _blob_images(rng, n: int, size: int, grid: int, with_blob=None, blob: int = 12):
    """Noise images (0..120), with a bright blob (230) in one cell of a grid x grid layout
    where ``with_blob`` (default: every image); (preprocessed float32 (n, 1, size, size),
    the blob's cell per image)."""
    cell = size // grid
    images = rng.integers(0, 120, size=(n, size, size)).astype(np.float32)
    cells = rng.integers(0, grid, size=(n, 2))
    for i, (gr, gc) in enumerate(cells):
        if with_blob is None or with_blob[i]:
            r = gr * cell + rng.integers(0, cell - blob + 1)
            c = gc * cell + rng.integers(0, cell - blob + 1)
            images[i, r : r + blob, c : c + blob] = 230
    x = ((images / 255 - 0.5) / 0.5)[:, None].astype(np.float32)
    return x, cells[:, 0] * grid + cells[:, 1]


def _train_blob_detector(steps: int = 30, size: int = 64, batch: int = 32):
    """DenseNet-121 trained ``steps`` Adam steps to tell images with a blob (anywhere) from
    images without: ~15-20 s on 2 cores, then (almost) always right at 64 px."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    network = build_model(1, 2)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    network.train()
    for _ in range(steps):
        y = rng.integers(0, 2, size=batch)
        x, _ = _blob_images(rng, batch, size, grid=1, with_blob=y)
        loss = F.cross_entropy(network(torch.from_numpy(x)), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.eval()


@pytest.mark.timeout(240)
def test_model_randomisation_sanity_check() -> None:
    """The trained model's CAM of the blob class finds the blob and is not the map of the
    same architecture with random weights (Spearman rank correlation low); the random
    model's map does not find it. Evaluated at 128 px (4 x 4 maps), the blob in one cell."""
    trained, random = _train_blob_detector(), build_model(1, 2).eval()
    x, cells = _blob_images(np.random.default_rng(1), 16, 128, grid=4)
    found, mass, rho = {}, {}, []
    maps = {}
    for name, network in (("trained", trained), ("random", random)):
        _, cam = class_activation_maps(CamHead(network, False), x)
        maps[name] = cam[:, 1]  # the blob class
        flat = maps[name].reshape(len(x), -1)
        found[name] = float(np.mean(flat.argmax(axis=1) == cells))
        positive = np.maximum(flat, 0)
        mass[name] = float(
            np.mean(positive[np.arange(len(x)), cells] / np.maximum(positive.sum(1), 1e-12))
        )
    for i in range(len(x)):
        up = [upsample(maps[k][i], 128, 128) for k in ("trained", "random")]
        rho.append(_spearman(*up))
    mean_rho = float(np.mean(rho))
    print(
        f"\nmodel randomisation: Spearman(trained, random) mean {mean_rho:.3f}, "
        f"mean |rho| {np.mean(np.abs(rho)):.3f}; blob cell is the argmax: trained "
        f"{found['trained']:.2f}, random {found['random']:.2f} (chance 1/16); share of the "
        f"positive map on the blob cell: trained {mass['trained']:.2f}, random {mass['random']:.2f}"
    )
    assert found["trained"] >= 0.9 and found["random"] <= 0.4
    assert mass["trained"] > mass["random"] + 0.2
    assert abs(mean_rho) < 0.4


def test_fp16_variant_carries_the_maps(tiny_cam_onnx, tmp_path) -> None:
    """The float16 variant keeps both outputs (float32 at the edges); ONNX Runtime runs its
    1 x 1 Conv in float16 on the CPU, and the maps stay close to the float32 ones."""
    import onnxruntime as ort

    from serving.export.fp16 import FP16_PARITY_ATOL, convert_fp16, fp16_parity

    half = convert_fp16(tiny_cam_onnx, tmp_path / "half.onnx")
    x = np.random.default_rng(0).normal(size=(8, 1, 32, 32)).astype(np.float32)
    assert fp16_parity(tiny_cam_onnx, half, x) <= FP16_PARITY_ATOL  # the probabilities
    runs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})
        for p in (tiny_cam_onnx, half)
    ]
    assert [a.dtype for a in runs[1]] == [np.float32, np.float32]
    scale = float(np.abs(runs[0][1]).max())
    assert float(np.abs(runs[0][1] - runs[1][1]).max()) <= 1e-2 * max(scale, 1.0)
