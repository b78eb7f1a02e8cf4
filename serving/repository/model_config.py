"""The ``config.pbtxt`` of every model medimg puts in a Triton repository, built as
``model_config_pb2.ModelConfig`` messages (never from text templates).

For a classifier NAME (``ModelSpec.model_name``) the repository holds:

- ``NAME_onnx``: the ONNX classifier. ``--target cpu`` runs it with ONNX Runtime inside
  a Python-backend model (the embedded server has only that backend); ``--target gpu``
  uses ``platform: "onnxruntime_onnx"`` on ``KIND_GPU`` with Triton's TensorRT execution
  accelerator, so the official container builds an engine at load time (warmed up).
- ``NAME_trt`` (after ``medimg build-engine``): ``platform: "tensorrt_plan"``.
- ``NAME_preprocess``: Python backend, PNG/JPEG/DICOM bytes in, the float tensor out,
  with the training code's own decode/resize/normalise.
- ``NAME``: the ensemble ``NAME_preprocess -> NAME_onnx`` (or ``NAME_trt``): bytes in,
  ``probabilities`` out with ``label_filename`` for the classification extension; a spec
  with a ``cam_name`` adds the class activation maps ``[K, -1, -1]`` (here and upstream).

Try it::

    python -c "from serving.repository.model_config import *; from training.spec import ModelSpec; \
print(ensemble_config(ModelSpec.for_dataset('pneumoniamnist', 64), RepositoryOptions()))"
"""

from __future__ import annotations

from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as pb

from training.errors import ConfigError
from training.spec import ModelSpec

LABELS_FILE = "labels.txt"
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
SPEC_PARAMETER = "medimg_spec"
MAX_IMAGE_BYTES_PARAMETER = "max_image_bytes"
IMAGE_INPUT = "image"  # the ensemble's and the preprocess model's input: encoded bytes
WARMUP_DIR = "warmup"
WARMUP_IMAGE = "sample_image.bin"  # Triton's TYPE_STRING layout: uint32 length + bytes
TARGETS = ("cpu", "gpu")
PRECISIONS = ("FP32", "FP16")


@dataclass(frozen=True)
class RepositoryOptions:
    """How the models are batched, placed and versioned (``medimg export`` options)."""

    target: str = "cpu"
    max_batch_size: int = 32
    # Defaults measured on 2 CPU cores (benchmarks/results/serving_sweep.md): two classifier
    # instances of one ORT thread each beat one of two threads. Batches of 8 are where a
    # one-thread ORT run reaches its per-image floor; Triton cuts a longer queue into batches
    # of the preferred size and waits up to the delay for a shorter one, which turns the uneven
    # batches that form without them (1, 7, 1, 7 at concurrency 16) into even ones: about
    # 10 % more images/s, for at most 0.5 ms more at concurrency 1 (within the noise there).
    # Both apply to the classifier (and engine) only: NAME_preprocess batches whatever is
    # queued when its instance frees up, with no delay (decoding gains little from batching:
    # a 0.5 ms delay there cost 0.8 ms of concurrency-1 p50 through the ensemble, 6 rounds
    # of 6, and nothing at concurrency 16).
    preferred_batch_sizes: tuple[int, ...] = (8,)
    max_queue_delay_us: int = 500
    instance_count: int = 2
    preprocess_instance_count: int = 1
    intra_op_threads: int = (
        0  # ONNX Runtime per instance; 0 = the serving machine's cores / instances
    )
    # cpu: an instance runs on every core while no other one runs (serving/triton_backend/
    # model.py): a lone request's median latency ~25 % lower, nothing measurable under load
    borrow_idle_cores: bool = True
    version_policy: str = "latest:1"  # latest:N | all | specific:V[,V...]
    trt_precision: str = "FP16"  # TensorRT accelerator / engine precision on --target gpu
    warmup: bool = True
    # the classifier's second output, the class activation maps (medimg explain); without it
    # NAME_onnx has one input and one output, what Triton's example image_client.py requires
    cam: bool = True
    max_image_bytes: int = 32 << 20  # NAME_preprocess refuses a larger encoded image

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"target: expected one of {TARGETS}, got {self.target!r}")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        for field, value in (
            ("instance_count", self.instance_count),
            ("preprocess_instance_count", self.preprocess_instance_count),
        ):
            if value < 1:
                raise ConfigError(f"{field} must be >= 1, got {value}")
        if self.intra_op_threads < 0:
            raise ConfigError(
                f"intra_op_threads must be >= 0 (0 = cores / instances), got {self.intra_op_threads}"
            )
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if any(size < 1 for size in self.preferred_batch_sizes):
            raise ConfigError(
                f"preferred_batch_sizes must all be >= 1, got {list(self.preferred_batch_sizes)}"
            )
        if self.trt_precision not in PRECISIONS:
            raise ConfigError(
                f"trt_precision: expected one of {PRECISIONS}, got {self.trt_precision!r}"
            )
        if self.max_image_bytes < 1:
            raise ConfigError(f"max_image_bytes must be >= 1, got {self.max_image_bytes}")
        parse_version_policy(self.version_policy)


def parse_version_policy(text: str) -> pb.ModelVersionPolicy:
    """``latest:N``, ``all`` or ``specific:1,2`` -> ``ModelVersionPolicy``."""
    kind, _, arg = text.partition(":")
    policy = pb.ModelVersionPolicy()
    try:
        if kind == "latest":
            n = int(arg or 1)
            if n < 1:
                raise ValueError
            policy.latest.num_versions = n
        elif kind == "all" and not arg:
            policy.all.SetInParent()
        elif kind == "specific":
            versions = [int(v) for v in arg.split(",")]
            if not versions or min(versions) < 1:
                raise ValueError
            policy.specific.versions.extend(versions)
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"version_policy: expected latest:N, all or specific:V[,V...] with N, V >= 1, "
            f"got {text!r}"
        ) from None
    return policy


def version_policy_text(policy: pb.ModelVersionPolicy) -> str:
    """The ``version_policy`` option a ``ModelVersionPolicy`` was made from (the inverse of
    :func:`parse_version_policy`; Triton's default, no policy set, is ``latest:1``)."""
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return "all"
    if kind == "specific":
        return "specific:" + ",".join(map(str, policy.specific.versions))
    return f"latest:{policy.latest.num_versions or 1}"


def options_from_config(
    classifier: pb.ModelConfig, preprocess: pb.ModelConfig | None = None
) -> RepositoryOptions:
    """The :class:`RepositoryOptions` a classifier's config (``NAME_onnx`` or ``NAME_trt``)
    and, when given, its ``NAME_preprocess`` config hold: the inverse of
    :func:`classifier_config` and :func:`preprocess_config`, for everything that reads a
    repository back (``medimg tune-server``, the serving benchmarks). What a config does
    not record keeps its default: the preprocess options without ``preprocess``,
    ``borrow_idle_cores`` and ``trt_precision`` where the target has no such setting."""
    try:
        return RepositoryOptions(**_option_values(classifier, preprocess))
    except (ConfigError, ValueError) as exc:  # a hand-edited config: name the model
        raise ConfigError(f"model config {classifier.name or '?'}: {exc}") from exc


def _option_values(classifier: pb.ModelConfig, preprocess: pb.ModelConfig | None) -> dict:
    params = {key: value.string_value for key, value in classifier.parameters.items()}
    gpu = classifier.backend != "python"
    values: dict = {
        "target": "gpu" if gpu else "cpu",
        "max_batch_size": classifier.max_batch_size,
        "preferred_batch_sizes": tuple(classifier.dynamic_batching.preferred_batch_size),
        "max_queue_delay_us": classifier.dynamic_batching.max_queue_delay_microseconds,
        "instance_count": sum(g.count or 1 for g in classifier.instance_group) or 1,
        "intra_op_threads": int(
            params.get("intra_op_thread_count" if gpu else "intra_op_threads") or 0
        ),
        "version_policy": version_policy_text(classifier.version_policy),
        "warmup": len(classifier.model_warmup) > 0,
    }
    if not gpu:
        values["borrow_idle_cores"] = params.get("borrow_idle_cores") == "1"
    accelerators = classifier.optimization.execution_accelerators.gpu_execution_accelerator
    for accelerator in accelerators:
        if accelerator.name == "tensorrt" and "precision_mode" in accelerator.parameters:
            values["trt_precision"] = accelerator.parameters["precision_mode"]
    if preprocess is not None:
        values["preprocess_instance_count"] = (
            sum(g.count or 1 for g in preprocess.instance_group) or 1
        )
        limit = {k: v.string_value for k, v in preprocess.parameters.items()}.get(
            MAX_IMAGE_BYTES_PARAMETER
        )
        if limit:
            values["max_image_bytes"] = int(limit)
    return values


def classifier_name(spec: ModelSpec) -> str:
    return f"{spec.model_name}_onnx"


def engine_name(spec: ModelSpec) -> str:
    return f"{spec.model_name}_trt"


def preprocess_name(spec: ModelSpec) -> str:
    return f"{spec.model_name}_preprocess"


def _check_spec(spec: ModelSpec) -> None:
    if spec.num_classes < 1 or spec.channels < 1 or spec.image_size < 1:
        raise ConfigError(f"model spec needs classes, channels and a size, got {spec}")
    name = spec.model_name
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"model name {name!r} is not a valid directory name")


def _base(name: str, spec: ModelSpec, opts: RepositoryOptions) -> pb.ModelConfig:
    config = pb.ModelConfig(name=name, max_batch_size=opts.max_batch_size)
    config.version_policy.CopyFrom(parse_version_policy(opts.version_policy))
    config.parameters[SPEC_PARAMETER].string_value = spec.to_json()
    return config


def _batching(config: pb.ModelConfig, opts: RepositoryOptions | None) -> None:
    """Dynamic batching on; with ``opts``, its preferred sizes and queue delay (the
    classifier's); without, batches of whatever is queued, no delay (NAME_preprocess)."""
    batching = config.dynamic_batching
    batching.SetInParent()  # dynamic batching on, even with every field at its default
    if opts is None:
        return
    sizes = sorted({s for s in opts.preferred_batch_sizes if s <= opts.max_batch_size})
    batching.preferred_batch_size.extend(sizes)
    batching.max_queue_delay_microseconds = opts.max_queue_delay_us


def _tensor_io(config: pb.ModelConfig, spec: ModelSpec, *, labels: bool, inputs=True) -> None:
    if inputs:  # the ensemble's is the encoded image
        config.input.add(  # the layout, for tools that read it (Triton's image_client.py)
            name=spec.input_name,
            data_type=pb.TYPE_FP32,
            format=pb.ModelInput.FORMAT_NCHW,
            dims=[spec.channels, spec.image_size, spec.image_size],
        )
    config.output.add(
        name=spec.output_name,
        data_type=pb.TYPE_FP32,
        dims=[spec.num_classes],
        label_filename=LABELS_FILE if labels else "",
    )
    if spec.cam_name:  # (N, K, h, w): h, w the feature map's size
        config.output.add(
            name=spec.cam_name, data_type=pb.TYPE_FP32, dims=[spec.num_classes, -1, -1]
        )


def _zero_warmup(config: pb.ModelConfig, spec: ModelSpec) -> None:
    warmup = config.model_warmup.add(name="zeros_batch1", batch_size=1, count=1)
    tensor = warmup.inputs[spec.input_name]
    tensor.data_type = pb.TYPE_FP32
    tensor.dims.extend([spec.channels, spec.image_size, spec.image_size])
    tensor.zero_data = True


def classifier_config(
    spec: ModelSpec, opts: RepositoryOptions, *, name: str = ""
) -> pb.ModelConfig:
    """``NAME_onnx``: ONNX Runtime in the Python backend (cpu) or ``onnxruntime_onnx`` with
    the TensorRT accelerator (gpu). Same inputs, outputs and batching either way."""
    _check_spec(spec)
    config = _base(name or classifier_name(spec), spec, opts)
    _tensor_io(config, spec, labels=True)
    _batching(config, opts)
    if opts.target == "cpu":
        config.backend = "python"
        config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=opts.instance_count)
        config.parameters["onnx_file"].string_value = ONNX_FILE
        config.parameters["intra_op_threads"].string_value = str(opts.intra_op_threads)
        config.parameters["borrow_idle_cores"].string_value = "1" if opts.borrow_idle_cores else "0"
    else:
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = ONNX_FILE
        config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU, count=opts.instance_count)
        trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
        trt.parameters["precision_mode"] = opts.trt_precision
        trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
        trt.parameters["trt_engine_cache_enable"] = "true"
        if opts.intra_op_threads:  # Triton's onnxruntime backend takes it as a model parameter
            config.parameters["intra_op_thread_count"].string_value = str(opts.intra_op_threads)
    if opts.warmup:
        _zero_warmup(config, spec)
    return config


def engine_config(spec: ModelSpec, opts: RepositoryOptions) -> pb.ModelConfig:
    """``NAME_trt``: the TensorRT plan ``medimg build-engine`` wrote."""
    _check_spec(spec)
    config = _base(engine_name(spec), spec, opts)
    config.platform = "tensorrt_plan"
    config.default_model_filename = PLAN_FILE
    _tensor_io(config, spec, labels=True)
    _batching(config, opts)
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU, count=opts.instance_count)
    if opts.warmup:
        _zero_warmup(config, spec)
    return config


def preprocess_config(spec: ModelSpec, opts: RepositoryOptions) -> pb.ModelConfig:
    """``NAME_preprocess``: encoded image bytes -> the classifier's float input."""
    _check_spec(spec)
    config = _base(preprocess_name(spec), spec, opts)
    config.backend = "python"
    config.parameters[MAX_IMAGE_BYTES_PARAMETER].string_value = str(opts.max_image_bytes)
    config.input.add(name=IMAGE_INPUT, data_type=pb.TYPE_STRING, dims=[1])
    config.output.add(
        name=spec.input_name,
        data_type=pb.TYPE_FP32,
        dims=[spec.channels, spec.image_size, spec.image_size],
    )
    _batching(config, None)  # no delay: see RepositoryOptions
    config.instance_group.add(
        kind=pb.ModelInstanceGroup.KIND_CPU, count=opts.preprocess_instance_count
    )
    if opts.warmup:
        warmup = config.model_warmup.add(name="sample_image", batch_size=1, count=1)
        tensor = warmup.inputs[IMAGE_INPUT]
        tensor.data_type = pb.TYPE_STRING
        tensor.dims.append(1)
        tensor.input_data_file = WARMUP_IMAGE
    return config


def ensemble_config(
    spec: ModelSpec, opts: RepositoryOptions, *, classifier: str = ""
) -> pb.ModelConfig:
    """``NAME``: bytes -> ``NAME_preprocess`` -> ``classifier`` -> probabilities + labels.
    Ensembles have no dynamic batching or warmup of their own: their steps do."""
    _check_spec(spec)
    config = _base(spec.model_name, spec, opts)
    config.version_policy.CopyFrom(parse_version_policy("latest:1"))  # its one version, 1/
    config.platform = "ensemble"
    config.input.add(name=IMAGE_INPUT, data_type=pb.TYPE_STRING, dims=[1])
    _tensor_io(config, spec, labels=True, inputs=False)
    steps = config.ensemble_scheduling.step
    pre = steps.add(model_name=preprocess_name(spec), model_version=-1)
    pre.input_map[IMAGE_INPUT] = IMAGE_INPUT
    pre.output_map[spec.input_name] = "preprocessed"
    cls = steps.add(model_name=classifier or classifier_name(spec), model_version=-1)
    cls.input_map[spec.input_name] = "preprocessed"
    for output in config.output:
        cls.output_map[output.name] = output.name
    config.parameters["medimg_classifier"].string_value = cls.model_name
    return config
