"""Write and read a Triton model repository for an ONNX classifier.

A model is a directory ``<repository>/<spec.model_name>/`` holding
``config.pbtxt`` (built as a ``ModelConfig`` protobuf, never from a template),
``labels.txt`` (for Triton's classification extension) and one version
directory with ``model.onnx`` and the Python-backend ``model.py`` that runs it
with ONNX Runtime. The config carries the :class:`~training.spec.ModelSpec` as
the parameter ``medimg_spec``, so clients learn the preprocessing contract from
the server::

    python -c "from pathlib import Path; from serving.repository import read_config, spec_from_config; \
print(spec_from_config(read_config(Path('model_repository/pneumoniamnist-densenet121'))))"
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from training.errors import ConfigError
from training.spec import ModelSpec

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
ONNX_FILE = "model.onnx"
BACKEND_FILE = "model.py"
SPEC_PARAMETER = "medimg_spec"


def backend_source() -> bytes:
    """The Python-backend ``model.py`` shipped in ``serving/triton_backend``."""
    return resources.files("serving.triton_backend").joinpath(BACKEND_FILE).read_bytes()


def build_config(
    spec: ModelSpec,
    *,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    max_queue_delay_us: int = 5000,
    instance_count: int = 1,
    intra_op_threads: int = 0,
) -> model_config_pb2.ModelConfig:
    """The ``ModelConfig`` message for ``spec``; raises ConfigError on out-of-range options."""
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if instance_count < 1:
        raise ConfigError(f"instance_count must be >= 1, got {instance_count}")
    if intra_op_threads < 0:
        raise ConfigError(
            f"intra_op_threads must be >= 0 (0 = ORT default), got {intra_op_threads}"
        )
    if max_queue_delay_us < 0:
        raise ConfigError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if any(size < 1 for size in preferred_batch_sizes):
        raise ConfigError(f"preferred batch sizes must be >= 1, got {list(preferred_batch_sizes)}")
    if spec.num_classes < 1 or spec.channels < 1 or spec.image_size < 1:
        raise ConfigError(f"model spec needs classes, channels and a size, got {spec}")

    config = model_config_pb2.ModelConfig(
        name=spec.model_name,
        backend="python",
        max_batch_size=max_batch_size,
    )
    config.input.add(
        name=spec.input_name,
        data_type=model_config_pb2.TYPE_FP32,
        dims=[spec.channels, spec.image_size, spec.image_size],
    )
    config.output.add(
        name=spec.output_name,
        data_type=model_config_pb2.TYPE_FP32,
        dims=[spec.num_classes],
        label_filename=LABELS_FILE,
    )
    batching = config.dynamic_batching
    batching.preferred_batch_size.extend(
        sorted({s for s in preferred_batch_sizes if s <= max_batch_size})
    )
    batching.max_queue_delay_microseconds = max_queue_delay_us
    config.instance_group.add(
        kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=instance_count
    )
    config.version_policy.latest.num_versions = 1
    config.parameters["onnx_file"].string_value = ONNX_FILE
    config.parameters["intra_op_threads"].string_value = str(intra_op_threads)
    config.parameters[SPEC_PARAMETER].string_value = spec.to_json()
    return config


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_classifier(
    repository: Path,
    spec: ModelSpec,
    onnx_path: Path,
    *,
    version: int = 1,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    max_queue_delay_us: int = 5000,
    instance_count: int = 1,
    intra_op_threads: int = 0,
) -> Path:
    """Write (or replace) one version of ``spec.model_name`` in ``repository``; returns the model dir."""
    config = build_config(
        spec,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        instance_count=instance_count,
        intra_op_threads=intra_op_threads,
    )
    if version < 1:
        raise ConfigError(f"model version must be >= 1, got {version}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX file {onnx_path} does not exist")
    name = spec.model_name
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"model name {name!r} is not a valid directory name")
    bad = [c for c in spec.class_names if not c or "\n" in c or "\r" in c]
    if bad:
        raise ConfigError(f"class names must be non-empty single lines, got {bad!r}")

    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version_dir = model_dir / str(version)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{version}.new-"))
    try:
        shutil.copyfile(onnx_path, staging / ONNX_FILE)
        (staging / BACKEND_FILE).write_bytes(backend_source())
        staging.chmod(0o755)
        if version_dir.exists():
            old = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{version}.old-"))
            os.replace(version_dir, old / "v")
            try:
                os.replace(staging, version_dir)
            except OSError:
                os.replace(old / "v", version_dir)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, version_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)

    _write_atomic(model_dir / LABELS_FILE, "".join(f"{c}\n" for c in spec.class_names).encode())
    # The config goes last: list_models() and Triton see the model only once it is whole.
    _write_atomic(model_dir / CONFIG_FILE, text_format.MessageToString(config).encode())
    return model_dir


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a ``config.pbtxt`` (or the one in model directory ``path``)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read model config {path}: {exc.strerror}") from exc
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"model config {path} is malformed: {exc}") from exc


def spec_from_config(config: model_config_pb2.ModelConfig) -> ModelSpec:
    """The ModelSpec stored in the config's ``medimg_spec`` parameter."""
    if SPEC_PARAMETER not in config.parameters:
        raise ConfigError(
            f"model {config.name or '?'} has no {SPEC_PARAMETER!r} parameter; "
            "was it written by serving.repository.write_classifier?"
        )
    return ModelSpec.from_json(config.parameters[SPEC_PARAMETER].string_value)


def list_models(repository: Path) -> list[str]:
    """Names of the model directories in ``repository`` that hold a config.pbtxt."""
    repository = Path(repository)
    if not repository.is_dir():
        raise ConfigError(f"model repository {repository} is not a directory")
    return sorted(
        p.name
        for p in repository.iterdir()
        if not p.name.startswith(".") and (p / CONFIG_FILE).is_file()
    )
