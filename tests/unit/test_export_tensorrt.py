"""serving/export/tensorrt.py: type-checked against the TensorRT stubs; refuses clearly on hosts without
TensorRT or a GPU (this one); builds and checks a real plan on a GPU host (``-m gpu``)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

from serving.export.tensorrt import INSTALL_HINT, build_engine, check_parity, require_gpu
from training.errors import ExportError

ROOT = Path(__file__).resolve().parents[2]
MYPY_INI = "[mypy]\n\n[mypy-tensorrt.*,tensorrt_bindings.*]\nignore_errors = True\n"
CANARY = """import tensorrt as trt


def canary(config: trt.IBuilderConfig, context: trt.IExecutionContext) -> None:
    config.set_flags(trt.BuilderFlag.FP16)
    context.execute_async_v3("not a stream handle")
"""


def _usable_stubs(dst: Path) -> Path:
    """tensorrt-stubs 10.13 installs bare ``tensorrt/*.pyi`` and ``tensorrt_bindings/*.pyi``
    with no ``py.typed`` beside them, so mypy treats ``tensorrt`` as untyped: every ``trt.X`` is
    Any and ``--ignore-missing-imports`` hides it (misspelt calls pass). Four of its signatures
    are not even valid Python (parameters named ``in``; a non-default after defaults). Copy the
    stubs into a ``MYPYPATH`` directory with those lines fixed."""
    dist = importlib.metadata.distribution("tensorrt-stubs")
    stubs = [f for f in dist.files or [] if f.suffix == ".pyi"]
    assert stubs, f"tensorrt-stubs {dist.version} installs no .pyi files"
    for f in stubs:
        text = f.read_text(encoding="utf-8")
        text = re.sub(r"(?<=[(,] )in: ", "in_: ", text)
        text = text.replace(", channel_axis: int)", ", channel_axis: int = ...)")
        target = dst / str(f)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def mypy_run(tmp_path_factory: pytest.TempPathFactory):
    try:
        version = importlib.metadata.version("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed: pip install tensorrt-stubs --no-deps")
    pytest.importorskip("mypy")
    tmp = tmp_path_factory.mktemp("mypy")
    env = {**os.environ, "MYPYPATH": str(_usable_stubs(tmp / "stubs"))}
    (tmp / "mypy.ini").write_text(MYPY_INI)
    cache = Path(tempfile.gettempdir()) / f"medimg-mypy-cache-{os.getuid()}"  # warm: ~3 s

    def run(*files: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "mypy", *files, "--ignore-missing-imports"]
        cmd += ["--follow-imports=silent", "--config-file", str(tmp / "mypy.ini")]
        cmd += ["--cache-dir", str(cache)]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    run.version = version  # type: ignore[attr-defined]
    run.tmp = tmp  # type: ignore[attr-defined]
    return run


def test_engine_module_type_checks_against_tensorrt_stubs(mypy_run):
    result = mypy_run("serving/export/tensorrt.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_really_checks_tensorrt_calls(mypy_run):
    """The canary misuses two TensorRT APIs: mypy must see both, or the test above proves
    nothing (as happens with the stubs as installed, where ``trt`` is Any)."""
    canary = mypy_run.tmp / "trt_canary.py"
    canary.write_text(CANARY)
    result = mypy_run(str(canary))
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert '"IBuilderConfig" has no attribute "set_flags"' in out, out
    assert 'Argument 1 to "execute_async_v3" of "IExecutionContext" has incompatible type' in out


def _real_tensorrt() -> bool:
    try:
        import tensorrt
    except (ImportError, OSError):
        return False
    return hasattr(tensorrt, "Builder")  # not just the stubs' bare `tensorrt/` directory


def test_refuses_on_this_host_and_writes_nothing(tiny_classifier_onnx: Path, tmp_path: Path):
    import torch

    if _real_tensorrt() and torch.cuda.is_available():
        pytest.skip("this host has TensorRT and a GPU: nothing is missing")
    if _real_tensorrt():
        expected = r"no NVIDIA GPU is visible \(torch\.cuda\.is_available\(\) is False"
    else:  # here: `import tensorrt` finds only the stubs' directory (a namespace package)
        expected = r"TensorRT is not (installed|importable).*" + re.escape(INSTALL_HINT)
    with pytest.raises(ExportError, match=expected):
        require_gpu()
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=expected):
        build_engine(
            tiny_classifier_onnx,
            out / "model.plan",
            max_batch_size=8,
            opt_batch_size=4,
            int8_calibration=np.zeros((4, 1, 32, 32), np.float32),
            timing_cache=out / "timing.cache",
        )
    assert not out.exists()  # no plan, no timing or calibration cache: never a fake plan
    with pytest.raises(ExportError, match=expected):
        check_parity(out / "model.plan", tiny_classifier_onnx, np.zeros((1, 1, 32, 32)))


@pytest.mark.parametrize("installed", [None, types.ModuleType("tensorrt")], ids=["absent", "stubs"])
def test_message_without_tensorrt(monkeypatch: pytest.MonkeyPatch, installed):
    monkeypatch.setitem(sys.modules, "tensorrt", installed)  # None: `import tensorrt` fails
    with pytest.raises(ExportError) as info:
        require_gpu()
    message = str(info.value)
    assert "pip install '.[tensorrt]' on a host with NVIDIA's index" in message
    assert "tensorrt cannot be installed on this machine" in message


def test_message_without_gpu(monkeypatch: pytest.MonkeyPatch):
    import torch

    fake = types.ModuleType("tensorrt")
    fake.Builder = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExportError) as info:
        require_gpu()
    message = str(info.value)
    assert "no NVIDIA GPU is visible (torch.cuda.is_available() is False" in message
    assert "tied to the GPU model and TensorRT version" in message
    assert "build it where the server runs" in message


@pytest.mark.gpu
def test_build_plan_and_parity_on_gpu(tiny_classifier_onnx: Path, tmp_path: Path):
    trt = pytest.importorskip("tensorrt")
    if not hasattr(trt, "Builder"):
        pytest.skip("only tensorrt-stubs is installed, not TensorRT itself")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible: a TensorRT engine needs an NVIDIA GPU")
    from serving.export.fp16 import FP16_PARITY_ATOL

    images = np.random.default_rng(0).standard_normal((20, 1, 32, 32), dtype=np.float32)
    cache = tmp_path / "timing.cache"
    common = {"max_batch_size": 8, "opt_batch_size": 4, "timing_cache": cache}
    fp32 = build_engine(
        tiny_classifier_onnx, tmp_path / "fp32" / "model.plan", fp16=False, **common
    )
    assert (fp32.input_name, fp32.input_chw, fp32.batch_profile) == (
        "input",
        (1, 32, 32),
        (1, 4, 8),
    )
    assert fp32.plan_path.stat().st_size == fp32.plan_bytes > 0 and cache.stat().st_size > 0
    agree, diff = check_parity(fp32.plan_path, tiny_classifier_onnx, images)  # batches 8, 8, 4
    assert agree >= 0.95 and diff <= 1e-3, (agree, diff)  # 1e-3: TF32 is on by default

    fp16 = build_engine(tiny_classifier_onnx, tmp_path / "fp16" / "model.plan", **common)
    agree, diff = check_parity(fp16.plan_path, tiny_classifier_onnx, images)
    assert fp16.fp16 and agree >= 0.9 and diff <= FP16_PARITY_ATOL, (agree, diff)

    int8 = build_engine(
        tiny_classifier_onnx, tmp_path / "int8" / "model.plan", int8_calibration=images, **common
    )
    assert int8.int8 and int8.calibration_cache and int8.calibration_cache.stat().st_size > 0
    agree, diff = check_parity(int8.plan_path, tiny_classifier_onnx, images)
    assert agree >= 0.8 and diff <= 0.05, (agree, diff)
