"""serving/export/fp16.py on the tiny classifier: float16 inside, float32 at the edges, parity."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from serving.export.fp16 import FP16_PARITY_ATOL, convert_fp16, fp16_parity
from training.errors import ExportError


@pytest.fixture(scope="module")
def tiny_fp16(tiny_classifier_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_fp16(tiny_classifier_onnx, tmp_path_factory.mktemp("fp16") / "tiny_fp16.onnx")


def test_weights_are_float16_and_io_stays_float32(tiny_classifier_onnx: Path, tiny_fp16: Path):
    import onnx

    fp32, fp16 = onnx.load(str(tiny_classifier_onnx)), onnx.load(str(tiny_fp16))
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert {i.data_type for i in fp32.graph.initializer} == {FLOAT}  # the test means something
    types = {i.name: i.data_type for i in fp16.graph.initializer}
    assert types and set(types.values()) == {FLOAT16}, types
    io = [(v.name, v.type.tensor_type.elem_type) for v in (*fp16.graph.input, *fp16.graph.output)]
    assert io == [("input", FLOAT), ("probabilities", FLOAT)]
    # Cast nodes at the edges keep the float32 interface, so the Triton config is unchanged
    assert sum(n.op_type == "Cast" for n in fp16.graph.node) >= 2
    onnx.checker.check_model(fp16, full_check=True)


def test_written_like_a_normal_file(tiny_fp16: Path):
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_fp16.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by a Triton container
    assert [p.name for p in tiny_fp16.parent.iterdir()] == [tiny_fp16.name]  # no temp left


def test_parity_within_bound(tiny_classifier_onnx: Path, tiny_fp16: Path):
    images = np.random.default_rng(0).standard_normal((40, 1, 32, 32), dtype=np.float32)
    diff = fp16_parity(tiny_classifier_onnx, tiny_fp16, images)  # 2 batches: 32 + 8
    # > 0: ONNX Runtime really computes in float16 (an unconverted copy would give exactly 0)
    assert 0 < diff <= FP16_PARITY_ATOL, diff
    assert fp16_parity(tiny_classifier_onnx, tiny_classifier_onnx, images) == 0.0


def test_parity_reports_nan_as_infinite(tiny_classifier_onnx: Path, tiny_fp16: Path):
    images = np.full((2, 1, 32, 32), np.nan, dtype=np.float32)
    assert fp16_parity(tiny_classifier_onnx, tiny_fp16, images) == float("inf")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupted_model_names_the_file(tiny_classifier_onnx: Path, tmp_path: Path, damage: str):
    data = tiny_classifier_onnx.read_bytes()
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x08\x07not onnx")
    dst = tmp_path / "out" / "model_fp16.onnx"
    with pytest.raises(ExportError, match=r"broken\.onnx: not a valid ONNX model"):
        convert_fp16(bad, dst)
    assert not dst.exists()


def test_missing_model_and_bad_images(tiny_classifier_onnx: Path, tmp_path: Path):
    with pytest.raises(ExportError, match=r"nowhere\.onnx: not a valid ONNX model"):
        convert_fp16(tmp_path / "nowhere.onnx", tmp_path / "x.onnx")
    with pytest.raises(ExportError, match=r"nowhere\.onnx"):
        fp16_parity(tiny_classifier_onnx, tmp_path / "nowhere.onnx", np.zeros((1, 1, 32, 32)))
    with pytest.raises(ExportError, match=r"expected \(N >= 1, C, H, W\)"):
        fp16_parity(tiny_classifier_onnx, tiny_classifier_onnx, np.zeros((1, 32, 32)))
