"""Fixtures for the Triton tests: a tiny ONNX classifier, its ModelSpec and a model repository;
plus helpers shared by the server tests (free ports, child processes from /proc).

Imported by ``tests/conftest.py``; run the tests that use them with::

    python -m pytest tests/test_repository.py tests/test_server.py tests/test_server_lifecycle.py -q
"""

from __future__ import annotations

import os
import types
import warnings
from pathlib import Path

import pytest

from training.spec import ModelSpec

__all__ = [
    "MODEL",
    "FakeTritonError",
    "_children",
    "_ports",
    "_processes",
    "export_tiny_onnx",
    "fake_pb_utils",
    "running_server",
    "tiny_classifier_onnx",
    "tiny_classifier_repository",
    "tiny_classifier_spec",
    "tiny_module",
    "triton_cache_dir",
]

MODEL = "pneumoniamnist-densenet121"


def _ports() -> dict[str, int]:
    """Three distinct free ports as TritonServer keyword arguments."""
    from serving.server import find_free_port

    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(find_free_port())
    http, grpc, metrics = sorted(ports)
    return {"http_port": http, "grpc_port": grpc, "metrics_port": metrics}


def running_server(repository: Path, log: Path, **options):
    """A tritonserver on free loopback ports for a fixture to ``yield from``: ready (a loaded
    machine gets 180 s), stopped by its PID afterwards. ``options`` go to TritonServer."""
    from serving.server import TritonServer

    srv = TritonServer(repository, log_file=log, **options, **_ports())
    srv.start()
    try:
        srv.wait_ready(timeout=180)
        yield srv
    finally:
        srv.stop()


def _processes(field: int, value: int) -> list[int]:
    """PIDs whose /proc/<pid>/stat field (after the name) equals value: 1 = ppid, 2 = pgid."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[field]) == value and fields[0] not in "ZX":
            found.append(int(stat.parent.name))
    return found


def _children(pid: int) -> list[int]:
    return _processes(1, pid)


@pytest.fixture(scope="session")
def tiny_classifier_spec() -> ModelSpec:
    return ModelSpec(
        dataset="pneumoniamnist",
        task="binary-class",
        class_names=("normal", "pneumonia"),
        image_size=32,
        channels=1,
    )


def tiny_module(seed: int = 0):
    """The tiny classifier as a PyTorch module (returns probabilities)."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
        torch.nn.Softmax(dim=1),
    ).eval()


def export_tiny_onnx(path: Path, seed: int = 0) -> Path:
    """Conv → pool → linear → softmax, input (N, 1, 32, 32), output (N, 2); dynamic batch.
    Another ``seed`` gives other weights (a "new version" of the model)."""
    import torch

    model = tiny_module(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.randn(1, 1, 32, 32),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["probabilities"],
            dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
        )
    return path


@pytest.fixture(scope="session")
def tiny_classifier_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_classifier_repository(
    tmp_path_factory: pytest.TempPathFactory, tiny_classifier_spec, tiny_classifier_onnx
) -> Path:
    """A model repository holding the tiny classifier as ``pneumoniamnist-densenet121`` v1:
    the ensemble, its ``_preprocess`` and its ``_onnx`` classifier."""
    from serving.repository import write_model_set

    repository = tmp_path_factory.mktemp("model_repository")
    write_model_set(repository, tiny_classifier_spec, tiny_classifier_onnx)
    return repository


@pytest.fixture(scope="session")
def triton_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Point ``MEDIMG_CACHE_DIR`` (the prepared tritonserver copy, ~29 MB) at a temporary dir."""
    path = tmp_path_factory.mktemp("medimg_cache")
    old = os.environ.get("MEDIMG_CACHE_DIR")
    os.environ["MEDIMG_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MEDIMG_CACHE_DIR", None)
    else:
        os.environ["MEDIMG_CACHE_DIR"] = old


class FakeTritonError(Exception):
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message, code=INTERNAL):
        super().__init__(message)
        self.code = code


def fake_pb_utils() -> types.ModuleType:
    """The parts of ``triton_python_backend_utils`` our backend model.py files use, to run
    them in process; the real server runs them in tests/test_server.py."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self.error = list(output_tensors), error

    def get_input_tensor_by_name(request, name):
        return request.get(name)

    logged: list[tuple[str, str]] = []  # what the server would log, for tests to read
    logger = types.SimpleNamespace(
        log_info=lambda message: logged.append(("info", message)),
        log_warn=lambda message: logged.append(("warn", message)),
    )

    pb.Tensor, pb.InferenceResponse, pb.TritonError = Tensor, InferenceResponse, FakeTritonError
    pb.TritonModelException = RuntimeError
    pb.get_input_tensor_by_name = get_input_tensor_by_name
    pb.Logger, pb.logged = logger, logged
    return pb
