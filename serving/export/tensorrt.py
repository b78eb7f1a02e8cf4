"""Build a TensorRT engine (``model.plan``) from the ONNX classifier; check it against ONNX Runtime.

An engine is tied to the GPU model and TensorRT version that built it: build it where Triton
serves it. Needs ``pip install '.[tensorrt]'`` (NVIDIA's index) and an NVIDIA GPU; without
them every function raises :class:`~training.errors.ExportError` naming what is missing::

    python -c "from pathlib import Path; from serving.export.tensorrt import build_engine, check_parity; \
from training.data import DataOptions, open_split; \
m = Path('model_repository/pneumoniamnist-densenet121_onnx/1/model.onnx'); \
p = Path('model_repository/pneumoniamnist-densenet121_trt/1/model.plan'); \
print(build_engine(m, p, max_batch_size=32, opt_batch_size=16, timing_cache=Path('trt.cache'))); \
val = open_split(DataOptions('pneumoniamnist', '../shared/data'), 'val', image_size=64, max_samples=64); \
x = val.model_input((0.5,), (0.5,)); \
print(check_parity(p, m, x))  # (top-1 agreement, max abs diff)"

INT8 (``int8_calibration``: preprocessed (N, C, H, W) validation images) uses the implicit
``IInt8EntropyCalibrator2`` (deprecated since TensorRT 10.1 for explicit Q/DQ quantization,
still supported); its cache is written beside the plan as ``<plan>.calibration``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serving.repository.layout import write_atomic
from training.errors import ExportError

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install '.[tensorrt]' on a host with NVIDIA's index; tensorrt cannot be installed on this machine"


@dataclass(frozen=True)
class EngineReport:
    plan_path: Path
    input_name: str
    input_chw: tuple[int, int, int]
    batch_profile: tuple[int, int, int]  # min, opt, max
    fp16: bool
    int8: bool
    plan_bytes: int
    build_seconds: float
    tensorrt_version: str
    device: str
    timing_cache: Path | None = None
    calibration_cache: Path | None = None


def require_gpu() -> None:
    """Raise :class:`ExportError` unless TensorRT imports and an NVIDIA GPU is visible."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        raise ExportError(f"TensorRT is not importable ({exc}): {INSTALL_HINT}") from exc
    if not hasattr(tensorrt, "Builder"):  # e.g. only the `tensorrt-stubs` type stubs
        where = list(getattr(tensorrt, "__path__", []))
        raise ExportError(f"TensorRT is not installed (no Builder in {where}): {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available():
        raise ExportError(
            "no NVIDIA GPU is visible (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}). A TensorRT engine is tied "
            "to the GPU model and TensorRT version that build it: build it where the server runs"
        )


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _logger() -> tuple[trt.ILogger, list[str]]:
    """A TensorRT logger that forwards to :mod:`logging` and keeps the errors for messages."""
    import tensorrt as trt

    errors: list[str] = []
    s = trt.ILogger.Severity
    levels = {s.INTERNAL_ERROR: logging.ERROR, s.ERROR: logging.ERROR, s.WARNING: logging.WARNING}

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            level = levels.get(severity, logging.DEBUG)
            if level >= logging.ERROR:
                errors.append(msg)
            log.log(level, "TensorRT: %s", msg)

    return _Logger(), errors


def _calibrator(images: np.ndarray, batch: int, cache_path: Path) -> trt.IInt8EntropyCalibrator2:
    """Feeds ``images`` in batches of ``batch`` through one CUDA buffer."""
    import tensorrt as trt
    import torch

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._images = np.ascontiguousarray(images, dtype=np.float32)
            self._device = torch.empty((batch, *images.shape[1:]), device="cuda")
            self._next = 0
            self._cache: bytes | None = None  # TensorRT reads it after we return: keep alive

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int]:
            if self._next + batch > len(self._images):
                return []  # no more batches
            chunk = self._images[self._next : self._next + batch]
            self._next += batch
            self._device.copy_(torch.from_numpy(chunk))
            torch.cuda.synchronize()
            return [int(self._device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:  # None: no cache, calibrate
            if cache_path.is_file():
                self._cache = cache_path.read_bytes()
                log.info("using INT8 calibration cache %s", cache_path)
            return self._cache

        def write_calibration_cache(self, cache: memoryview | bytes) -> None:
            write_atomic(cache_path, bytes(cache))

    return _EntropyCalibrator()


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    max_batch_size: int,
    opt_batch_size: int,
    fp16: bool = True,
    int8_calibration: np.ndarray | None = None,
    timing_cache: Path | None = None,
    workspace_bytes: int = 1 << 30,
) -> EngineReport:
    """``onnx_path`` -> serialized TensorRT engine at ``plan_path`` (written atomically), with one
    optimisation profile for batch sizes 1..``max_batch_size`` tuned for ``opt_batch_size``."""
    require_gpu()
    import tensorrt as trt
    import torch

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not 1 <= opt_batch_size <= max_batch_size:
        raise ExportError(f"need 1 <= opt_batch_size ({opt_batch_size}) <= max ({max_batch_size})")
    if not onnx_path.is_file():
        raise ExportError(f"ONNX model {onnx_path} does not exist")
    logger, errors = _logger()  # keeps TensorRT's error messages for ours
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: always explicit batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        found = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {found or errors}")
    if network.num_inputs != 1:
        raise ExportError(f"{onnx_path}: expected one input, got {network.num_inputs}")
    tensor = network.get_input(0)
    shape = _dims(tensor.shape)
    if len(shape) != 4 or shape[0] != -1 or min(shape[1:]) < 1:
        raise ExportError(
            f"{onnx_path}: input {tensor.name!r} has shape {shape}; expected (-1, C, H, W) "
            "with a dynamic batch axis and static C, H, W"
        )
    c, h, w = shape[1:]
    profile = builder.create_optimization_profile()
    low, opt, high = (trt.Dims4(n, c, h, w) for n in (1, opt_batch_size, max_batch_size))
    profile.set_shape(tensor.name, low, opt, high)
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        if not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast FP16; the FP16 engine may be slower")
        config.set_flag(trt.BuilderFlag.FP16)
    calibrator, calibration_cache = None, None
    if int8_calibration is not None:
        images = np.asarray(int8_calibration)
        batch = min(opt_batch_size, len(images))
        if images.ndim != 4 or images.shape[1:] != (c, h, w) or batch < 1:
            want = f"(N >= 1, {c}, {h}, {w})"
            raise ExportError(f"INT8 calibration images: expected {want}, got {images.shape}")
        calibration_cache = plan_path.with_name(plan_path.name + ".calibration")
        calibrator = _calibrator(images, batch, calibration_cache)
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        calib_profile = builder.create_optimization_profile()  # min = opt = max = batch
        calib_profile.set_shape(tensor.name, *[trt.Dims4(batch, c, h, w)] * 3)
        config.set_calibration_profile(calib_profile)
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        if not config.set_timing_cache(config.create_timing_cache(blob), False):
            log.warning("timing cache %s is from another GPU/TensorRT: starting anew", timing_cache)
            config.set_timing_cache(config.create_timing_cache(b""), False)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path}: {errors}")
    plan = bytes(serialized)
    if trt.Runtime(logger).deserialize_cuda_engine(plan) is None:
        raise ExportError(f"the engine built from {onnx_path} does not deserialize: {errors}")
    write_atomic(plan_path, plan)
    if timing_cache is not None:
        write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    log.info("built %s in %.1f s (%d bytes)", plan_path, seconds, len(plan))
    return EngineReport(
        plan_path=plan_path,
        input_name=tensor.name,
        input_chw=(c, h, w),
        batch_profile=(1, opt_batch_size, max_batch_size),
        fp16=fp16,
        int8=calibrator is not None,
        plan_bytes=len(plan),
        build_seconds=seconds,
        tensorrt_version=trt.__version__,
        device=torch.cuda.get_device_name(),
        timing_cache=timing_cache,
        calibration_cache=calibration_cache,
    )


def check_parity(plan_path: Path, onnx_path: Path, images: np.ndarray) -> tuple[float, float]:
    """Run ``images`` through the engine (TensorRT, GPU) and ONNX Runtime (CPU), in batches up
    to the engine's max; return (top-1 agreement in [0, 1], max abs difference) of the
    probabilities (the ONNX model's first output). Every other output (the class activation
    maps) must match ONNX Runtime's by name and shape; its difference is logged."""
    require_gpu()
    import onnxruntime as ort
    import tensorrt as trt
    import torch

    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ExportError(f"parity images: expected (N >= 1, C, H, W), got {images.shape}")
    logger, errors = _logger()
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise ExportError(f"{plan_path} does not deserialize (other TensorRT/GPU?): {errors}")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_input = session.get_inputs()[0].name
    onnx_outputs = [o.name for o in session.get_outputs()]
    if len(inputs) != 1 or sorted(outputs) != sorted(onnx_outputs):
        raise ExportError(
            f"{plan_path}: expected one input and the outputs {onnx_outputs} of {onnx_path}, "
            f"got {names}"
        )
    (inp,) = inputs
    if any(engine.get_tensor_dtype(n) != trt.DataType.FLOAT for n in names):
        raise ExportError(f"{plan_path}: expected float32 inputs and outputs")
    max_batch = _dims(engine.get_tensor_profile_shape(inp, 0)[2])[0]
    context = engine.create_execution_context()
    stream, agree = torch.cuda.Stream(), 0
    worst = dict.fromkeys(onnx_outputs, 0.0)
    for start in range(0, len(images), max_batch):
        chunk = images[start : start + max_batch]
        x = torch.from_numpy(chunk).cuda()
        if not context.set_input_shape(inp, trt.Dims(list(chunk.shape))):
            raise ExportError(f"{plan_path}: input shape {chunk.shape} outside the profile")
        context.set_tensor_address(inp, x.data_ptr())
        ys = {}
        for out in onnx_outputs:
            shape = _dims(context.get_tensor_shape(out))
            ys[out] = torch.empty(shape, dtype=torch.float32, device="cuda")
            context.set_tensor_address(out, ys[out].data_ptr())
        stream.wait_stream(torch.cuda.current_stream())  # x is copied on the default stream
        if not context.execute_async_v3(stream.cuda_stream):
            raise ExportError(f"{plan_path}: execute_async_v3 failed: {errors}")
        stream.synchronize()
        expected = dict(zip(onnx_outputs, session.run(None, {onnx_input: chunk}), strict=True))
        for out in onnx_outputs:
            got = ys[out].cpu().numpy()
            if got.shape != expected[out].shape:
                raise ExportError(
                    f"{plan_path}: output {out!r} {got.shape}, ONNX Runtime {expected[out].shape}"
                )
            diff = np.abs(got.astype(np.float64) - expected[out])  # NaN -> inf: max() drops it
            top = float(diff.max()) if np.isfinite(diff).all() else float("inf")
            worst[out] = max(worst[out], top)
        probs, reference = ys[onnx_outputs[0]].cpu().numpy(), expected[onnx_outputs[0]]
        agree += int(np.sum(probs.argmax(axis=1) == reference.argmax(axis=1)))
    for out in onnx_outputs[1:]:
        log.info("%s: output %r max abs diff %.3g against ONNX Runtime", plan_path, out, worst[out])
    return agree / len(images), worst[onnx_outputs[0]]
