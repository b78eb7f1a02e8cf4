"""A float16 variant of an fp32 ONNX classifier: weights and compute in float16, inputs and
outputs kept float32 (so the Triton ``config.pbtxt`` is unchanged), and its parity with the
original on ONNX Runtime CPU::

    python -c "from pathlib import Path; from training.data import DataOptions, open_split; \
from serving.export.fp16 import FP16_PARITY_ATOL, convert_fp16, fp16_parity; \
src = Path('model_repository/pneumoniamnist-densenet121_onnx/1/model.onnx'); \
dst = convert_fp16(src, Path('model_fp16.onnx')); \
val = open_split(DataOptions('pneumoniamnist', '../shared/data'), 'val', image_size=64, max_samples=64); \
x = val.model_input((0.5,), (0.5,)); \
print(fp16_parity(src, dst, x), 'allowed', FP16_PARITY_ATOL)"

Every DenseNet-121 op (Conv, BatchNormalization, Relu, Concat, AveragePool, MaxPool,
ReduceMean, Reshape, Gemm, Softmax) has a float16 CPU kernel in ONNX Runtime 1.32, so no op is
kept in float32. On CPU the float16 model is slower than float32 (measured 64 px, 2 threads:
13 vs 7 ms at batch 1, 107 vs 65 ms at batch 16); it halves the file (29 -> 15 MB) and is
meant for GPUs.

A classifier exported with class activation maps keeps its second output ``cam`` (float32
at the edge, float16 inside, like the probabilities: its 1 x 1 ``Conv`` has a float16
kernel too). :func:`fp16_parity` holds the probabilities (the first output) to
:data:`FP16_PARITY_ATOL`; the maps are logit-sized, not in [0, 1], and are not held to it.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.errors import ExportError

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

# Max abs difference allowed between fp16 and fp32 probabilities. Measured on this CPU
# (ONNX Runtime 1.32, opset 20 dynamo export, 64 px, 1 channel): DenseNet-121 trained two short
# epochs on PneumoniaMNIST (val acc 0.95) differs by 5e-4 to 8.7e-4 on 16 real validation images
# and by 1.15e-3 at most on all 524 (mean ~8e-5, top-1 agreement 100 %); untrained, 1.8e-5
# (outputs near 0.5); the tests' tiny conv net, 8e-6. 1e-2 leaves ~10x headroom over the worst
# seen and still catches a broken conversion (an op in the wrong precision, overflow to inf or
# NaN, lost normalisation), which moves probabilities by 0.1 or more.
FP16_PARITY_ATOL = 1e-2


def _load_checked(path: Path) -> onnx.ModelProto:
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(
            f"{path}: not a valid ONNX model ({type(exc).__name__}: {exc}); re-export it"
        ) from exc
    return model


def _io_types(model: onnx.ModelProto) -> list[int]:
    return [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)]


def convert_fp16(src: Path, dst: Path) -> Path:
    """Write the float16 variant of the fp32 ONNX model ``src`` to ``dst`` (atomically) and
    return ``dst``. Raises :class:`ExportError` naming the file if ``src`` is not valid ONNX."""
    import onnx
    from onnxconverter_common import float16

    src, dst = Path(src), Path(dst)
    model = _load_checked(src)
    if any(t != onnx.TensorProto.FLOAT for t in _io_types(model)):
        raise ExportError(f"{src}: expected float32 inputs and outputs, got {_io_types(model)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # keep_io_types: Cast nodes at the edges, so clients still send and get float32
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    clamped = [w for w in caught if "truncated" in str(w.message)]
    if clamped:  # weights below fp16's range (|x| < 1e-7) or above it (> 65504)
        log.info("%s: %d values clamped to the float16 range", src, len(clamped))
    for w in caught:
        if w not in clamped:
            log.warning("float16 conversion of %s: %s", src, w.message)
    try:
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:
        raise ExportError(f"float16 conversion of {src} is not valid ONNX: {exc}") from exc
    if any(t != onnx.TensorProto.FLOAT for t in _io_types(converted)):
        raise ExportError(f"float16 conversion of {src} changed the I/O types")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")  # honours the umask
    try:
        onnx.save(converted, str(tmp))
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def fp16_parity(fp32_path: Path, fp16_path: Path, images: np.ndarray) -> float:
    """Max abs difference between the first outputs (the probabilities) of the two models
    on ``images`` (float32 (N, C, H, W), run in batches of 32) with ONNX Runtime on CPU."""
    import onnxruntime as ort

    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ExportError(f"parity images: expected (N >= 1, C, H, W), got {images.shape}")
    sessions = []
    for path in (fp32_path, fp16_path):
        try:
            sessions.append(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
        except Exception as exc:
            raise ExportError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    worst = 0.0
    for start in range(0, len(images), 32):
        chunk = images[start : start + 32]
        ref, got = (s.run(None, {s.get_inputs()[0].name: chunk})[0] for s in sessions)
        if got.shape != ref.shape or got.dtype != np.float32:
            raise ExportError(
                f"{fp16_path}: output {got.dtype}{got.shape}, {fp32_path}: {ref.dtype}{ref.shape}"
            )
        diff = np.abs(got.astype(np.float64) - ref)  # NaN/inf -> inf (max() would drop a NaN)
        worst = max(worst, float(diff.max()) if np.isfinite(diff).all() else float("inf"))
    return worst
