"""``medimg build-engine``: turn a version of ``NAME_onnx`` into ``NAME_trt`` (a TensorRT
plan) inside the model repository, on the GPU host that will serve it.

``medimg export --target gpu`` writes the ONNX model (served at once by
``onnxruntime_onnx`` with the TensorRT accelerator) and ``NAME_onnx/build_engine.sh``,
the step that makes a standalone plan; run it where Triton runs, since a plan only
loads on the GPU model and TensorRT version that built it. Without a GPU or the
``tensorrt`` package it stops before writing anything and says which is missing. A
classifier exported with class activation maps gives a plan with both outputs
(``probabilities`` and ``cam``: the 1 x 1 convolution builds like any other layer);
``NAME_trt`` declares both, like ``NAME_onnx``, and the parity check compares both::

    medimg build-engine --repository model_repository --model pneumoniamnist-densenet121 \\
        --data-dir ../shared/data --int8-images 512 --use-in-ensemble
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from serving.repository.layout import read_config, spec_from_config, write_config, write_version
from serving.repository.model_config import (
    LABELS_FILE,
    ONNX_FILE,
    PLAN_FILE,
    RepositoryOptions,
    classifier_name,
    engine_config,
    engine_name,
    ensemble_config,
)
from training.errors import ConfigError

PARITY_IMAGES = 64


@dataclass
class EngineBuild:
    model_dir: Path
    version: int
    top1_agreement: float
    max_abs_diff: float
    seconds: float


def policy_text(config) -> str:
    """The ``--version-policy`` text of a config's ``version_policy``."""
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice") or "latest"
    if kind == "all":
        return "all"
    if kind == "specific":
        return "specific:" + ",".join(str(v) for v in policy.specific.versions)
    return f"latest:{policy.latest.num_versions or 1}"


def options_from(config, *, precision: str) -> RepositoryOptions:
    """The gpu-target options of an exported classifier config (batching, instances,
    versions), so the engine model batches and versions like the ONNX one."""
    batching = config.dynamic_batching
    return RepositoryOptions(
        target="gpu",
        max_batch_size=config.max_batch_size,
        preferred_batch_sizes=tuple(batching.preferred_batch_size) or (config.max_batch_size,),
        max_queue_delay_us=batching.max_queue_delay_microseconds,
        instance_count=max(1, config.instance_group[0].count if config.instance_group else 1),
        version_policy=policy_text(config),
        trt_precision=precision,
        warmup=bool(config.model_warmup),
    )


def build_step_script(repository: Path, model: str, version: int) -> Path:
    """``NAME_onnx/build_engine.sh``: the build step ``export --target gpu`` leaves behind
    (Triton ignores files that are not version directories)."""
    path = Path(repository) / f"{model}_onnx" / "build_engine.sh"
    path.write_text(
        "#!/bin/sh\n"
        "# Build the TensorRT plan of this model on the GPU host that serves it (a plan only\n"
        "# loads on the GPU and TensorRT version that built it). Extra options pass through,\n"
        "# e.g. --int8-images 512 --data-dir DIR --use-in-ensemble.\n"
        f'exec medimg build-engine --repository "$(dirname "$0")/.." --model {model} '
        f'--version {version} "$@"\n'
    )
    path.chmod(0o755)
    return path


def build_in_repository(
    repository: Path,
    model: str,
    *,
    data_dir: str,
    version: int | None = None,
    fp16: bool = True,
    int8_images: int = 0,
    use_in_ensemble: bool = False,
) -> EngineBuild:
    """Build ``NAME_trt/<version>/model.plan`` from ``NAME_onnx/<version>/model.onnx``,
    check it against ONNX Runtime on real validation images, write its config; with
    ``use_in_ensemble``, route the ensemble ``NAME`` through it."""
    from serving.export.onnx import parity_images
    from serving.export.tensorrt import build_engine, check_parity, require_gpu

    require_gpu()  # before reading anything: the clearest message on a CPU machine
    repository = Path(repository)
    cls_dir = repository / f"{model}_onnx"
    config = read_config(cls_dir)
    spec = spec_from_config(config)
    if classifier_name(spec) != cls_dir.name:
        raise ConfigError(f"{cls_dir}: holds {config.name!r}, not the classifier of {model!r}")
    versions = sorted(int(p.name) for p in cls_dir.iterdir() if p.name.isdigit())
    version = version or (versions[-1] if versions else 0)
    onnx_path = cls_dir / str(version) / ONNX_FILE
    if not onnx_path.is_file():
        raise ConfigError(f"no {onnx_path}; versions of {cls_dir.name}: {versions or 'none'}")
    opts = options_from(config, precision="FP16" if fp16 else "FP32")
    calibration = parity_images(spec, data_dir, int8_images) if int8_images else None
    trt_dir = repository / engine_name(spec)
    trt_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=trt_dir, prefix=".build-") as tmp:
        plan = Path(tmp) / PLAN_FILE
        report = build_engine(
            onnx_path,
            plan,
            max_batch_size=opts.max_batch_size,
            opt_batch_size=max(opts.preferred_batch_sizes),
            fp16=fp16,
            int8_calibration=calibration,
            timing_cache=trt_dir / "timing.cache",
        )
        top1, diff = check_parity(plan, onnx_path, parity_images(spec, data_dir, PARITY_IMAGES))
        write_version(trt_dir, version, {PLAN_FILE: plan})
    (trt_dir / LABELS_FILE).write_bytes((cls_dir / LABELS_FILE).read_bytes())
    write_config(trt_dir, engine_config(spec, opts))
    if use_in_ensemble:
        write_config(repository / model, ensemble_config(spec, opts, classifier=trt_dir.name))
    return EngineBuild(trt_dir, version, top1, diff, report.build_seconds)
