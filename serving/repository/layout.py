"""Write and read medimg's Triton model repository.

:func:`write_model_set` writes one classifier as three models (configs from
:mod:`serving.repository.model_config`): ``NAME_onnx/<v>/`` (``model.onnx``, plus the Python-backend
``model.py`` that runs it with ONNX Runtime on the CPU target), ``NAME_preprocess/<v>/``
(``model.py`` decoding image bytes, ``warmup/`` sample) and the ensemble ``NAME/1/``.
``labels.txt`` serves Triton's classification extension; every config carries the
:class:`~training.spec.ModelSpec` as the parameter ``medimg_spec``, so clients learn the
preprocessing contract from the server::

    python -c "from pathlib import Path; from serving.repository.layout import read_config, spec_from_config; \
print(spec_from_config(read_config(Path('model_repository/pneumoniamnist-densenet121'))))"
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from serving.repository.model_config import (
    LABELS_FILE,
    ONNX_FILE,
    SPEC_PARAMETER,
    WARMUP_DIR,
    WARMUP_IMAGE,
    RepositoryOptions,
    classifier_config,
    classifier_name,
    ensemble_config,
    preprocess_config,
    preprocess_name,
)
from training.errors import ConfigError
from training.spec import ModelSpec

__all__ = [
    "CONFIG_FILE",
    "LABELS_FILE",
    "ONNX_FILE",
    "SPEC_PARAMETER",
    "ModelSet",
    "RepositoryOptions",
    "list_models",
    "next_version",
    "read_config",
    "spec_from_config",
    "write_atomic",
    "write_config",
    "write_model_set",
    "write_version",
]

CONFIG_FILE = "config.pbtxt"
BACKEND_FILE = "model.py"
BACKEND_SOURCES = {"classifier": "model.py", "preprocess": "preprocess.py"}


def backend_source(kind: str = "classifier") -> bytes:
    """A Python-backend ``model.py`` shipped in ``serving/triton_backend``."""
    return resources.files("serving.triton_backend").joinpath(BACKEND_SOURCES[kind]).read_bytes()


@dataclass(frozen=True)
class ModelSet:
    """What :func:`write_model_set` wrote: model directories and the new version."""

    ensemble: Path
    classifier: Path
    preprocess: Path
    version: int

    @property
    def names(self) -> list[str]:
        return [self.preprocess.name, self.classifier.name, self.ensemble.name]


def check_writable(directory: Path, what: str) -> None:
    """Create ``directory`` if needed and make sure a file can be written in it, before
    work whose result would go there (``what`` names the option in the error)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".medimg-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"{what}: cannot write in {directory} ({exc.strerror or exc}); nothing was done"
        ) from exc


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """``data`` to ``path`` through a temporary file renamed into place, with ``mode``
    (default readable by everyone: a Triton container may run as another user)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_config(model_dir: Path, config: model_config_pb2.ModelConfig) -> Path:
    """``config.pbtxt`` from the message, atomically: a server polling the repository
    never reads half a file."""
    path = Path(model_dir) / CONFIG_FILE
    write_atomic(path, text_format.MessageToString(config).encode())
    return path


def write_version(model_dir: Path, version: int, files: dict[str, bytes | Path]) -> Path:
    """Version directory ``model_dir/<version>`` holding ``files`` (name -> bytes or a file
    to copy), staged beside it and renamed into place; an existing one is replaced whole."""
    if version < 1:
        raise ConfigError(f"model version must be >= 1, got {version}")
    model_dir.mkdir(parents=True, exist_ok=True)
    version_dir = model_dir / str(version)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{version}.new-"))
    try:
        for name, content in files.items():
            if isinstance(content, bytes):
                (staging / name).write_bytes(content)
            else:
                shutil.copyfile(content, staging / name)
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
    return version_dir


def next_version(model_dir: Path) -> int:
    """One past the highest numeric version directory (1 for a new model)."""
    versions = [int(p.name) for p in Path(model_dir).glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def warmup_image(spec: ModelSpec) -> bytes:
    """A PNG of the model's size and channels (a smooth gradient), in Triton's TYPE_STRING
    warmup layout: a little-endian uint32 length, then the bytes."""
    from PIL import Image

    ramp = np.linspace(0, 255, spec.image_size, dtype=np.float32)
    gray = ((ramp[None, :] + ramp[:, None]) / 2).astype(np.uint8)
    array = gray if spec.channels == 1 else np.repeat(gray[..., None], spec.channels, axis=2)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    data = buffer.getvalue()
    return struct.pack("<I", len(data)) + data


def _labels(spec: ModelSpec) -> bytes:
    bad = [c for c in spec.class_names if not c or "\n" in c or "\r" in c]
    if bad:
        raise ConfigError(f"class names must be non-empty single lines, got {bad!r}")
    return "".join(f"{c}\n" for c in spec.class_names).encode()


def write_model_set(
    repository: Path,
    spec: ModelSpec,
    onnx_path: Path,
    opts: RepositoryOptions | None = None,
    *,
    version: int | None = None,
) -> ModelSet:
    """Write version ``version`` (default: the next) of ``NAME_onnx`` and
    ``NAME_preprocess``, and the ensemble ``NAME`` over them, into ``repository``.

    Composing models first, the ensemble last, and every ``config.pbtxt`` after its
    files: a server that polls or is told to load sees each model only once it is whole,
    and the version it serves now stays on disk untouched."""
    opts = opts or RepositoryOptions()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX file {onnx_path} does not exist")
    labels = _labels(spec)
    cls_config = classifier_config(spec, opts)
    pre_config = preprocess_config(spec, opts)
    ens_config = ensemble_config(spec, opts)
    repository = Path(repository)
    cls_dir = repository / classifier_name(spec)
    pre_dir = repository / preprocess_name(spec)
    ens_dir = repository / spec.model_name
    if version is None:
        version = max(next_version(cls_dir), next_version(pre_dir))

    files: dict[str, bytes | Path] = {ONNX_FILE: onnx_path}
    if opts.target == "cpu":
        files[BACKEND_FILE] = backend_source("classifier")
    write_version(cls_dir, version, files)
    write_atomic(cls_dir / LABELS_FILE, labels)
    write_config(cls_dir, cls_config)

    write_version(pre_dir, version, {BACKEND_FILE: backend_source("preprocess")})
    (pre_dir / WARMUP_DIR).mkdir(exist_ok=True)
    write_atomic(pre_dir / WARMUP_DIR / WARMUP_IMAGE, warmup_image(spec))
    write_config(pre_dir, pre_config)

    (ens_dir / "1").mkdir(parents=True, exist_ok=True)  # an ensemble's version is its config
    write_atomic(ens_dir / LABELS_FILE, labels)
    write_config(ens_dir, ens_config)
    return ModelSet(ensemble=ens_dir, classifier=cls_dir, preprocess=pre_dir, version=version)


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
            "was it written by serving.repository.layout.write_model_set?"
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
