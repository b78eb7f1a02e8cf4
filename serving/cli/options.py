"""The option groups several commands share: training (one flag per ``TrainConfig``
field), the server, the model repository, the clients; each defined once, here.

    medimg train --help
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from serving.clients.contract import PROTOCOLS
from serving.server.config import (
    DEFAULT_MAX_REQUEST_BYTES,
    MODEL_CONTROL_MODES,
    ServerConfig,
    triton_s3_url,
)
from serving.server.network import is_loopback

if TYPE_CHECKING:
    from serving.server.process import TritonServer

DEFAULT_REPOSITORY = "model_repository"


# (flag, TrainConfig field, type, help). Defaults are the dataclass's (or the recipe's):
# argparse leaves every option None unless given, so a recipe never overrides a flag.
TRAIN_OPTIONS: list[tuple[str, str, type, str]] = [
    ("--dataset", "dataset", str, "a MedMNIST flag, 'folder' or 'chestxray14'"),
    ("--data-dir", "data_dir", str, "data folder (default $MEDIMG_DATA_DIR or ~/.medmnist)"),
    ("--size", "size", int, "MedMNIST file resolution: 28, 64, 128 or 224"),
    ("--image-size", "image_size", int, "network input size in pixels"),
    ("--max-train-samples", "max_train_samples", int, "subsample the training split (0: all)"),
    ("--val-fraction", "val_fraction", float, "folder/chestxray14 without given splits"),
    ("--test-fraction", "test_fraction", float, "folder/chestxray14 without given splits"),
    (
        "--cache-dir",
        "cache_dir",
        str,
        "decoded image cache (default $MEDIMG_CACHE_DIR/datasets, else ~/.cache/medimg/datasets)",
    ),
    ("--normalization", "normalization", str, "medmnist | imagenet"),
    ("--recipe", "recipe", str, "preset: medmnist | chexnet (explicit options win)"),
    ("--epochs", "epochs", int, ""),
    ("--batch-size", "batch_size", int, "per worker"),
    ("--optimizer", "optimizer", str, "adam | adamw | sgd"),
    ("--lr", "lr", float, ""),
    ("--weight-decay", "weight_decay", float, ""),
    ("--scheduler", "scheduler", str, "cosine | multistep | plateau | none"),
    ("--augment", "augment", str, "comma-separated: hflip, affine, contrast"),
    ("--aug-strength", "aug_strength", float, "0..1"),
    ("--label-smoothing", "label_smoothing", float, "0..0.5 (cross-entropy / BCE targets)"),
    (
        "--ema-decay",
        "ema_decay",
        float,
        "0: off; e.g. 0.99: validate, checkpoint and export an EMA of the weights",
    ),
    ("--mixup-alpha", "mixup_alpha", float, "0: off; e.g. 0.2: MixUp of training batches"),
    (
        "--cutmix-alpha",
        "cutmix_alpha",
        float,
        "0: off; e.g. 1.0: CutMix (with MixUp: one per batch)",
    ),
    ("--class-weighting", "class_weighting", str, "none | balanced"),
    ("--sampler", "sampler", str, "shuffle | balanced"),
    (
        "--precision",
        "precision",
        str,
        "auto (bf16 autocast where the device has native bf16: CUDA, or CPUs with "
        "AVX512-BF16/AMX; else fp32; fp16 on CUDA without bf16) | bf16 | fp16 (CUDA) | fp32",
    ),
    (
        "--memory-format",
        "memory_format",
        str,
        "auto (channels_last on CPU, contiguous on CUDA) | channels_last | contiguous",
    ),
    (
        "--pretrained-weights",
        "pretrained_weights",
        str,
        "local DenseNet-121 .pth (ImageNet/CheXNet)",
    ),
    ("--model-name", "model_name", str, "registered/served name (default DATASET-densenet121)"),
    ("--seed", "seed", int, ""),
    (
        "--positive-class",
        "positive_class",
        str,
        "binary tasks: the class that is the finding (default: from the data set; folder data "
        "sets without a class named like normal/healthy/benign need it)",
    ),
    (
        "--gate",
        "gate",
        str,
        "YAML promotion gate (min_auc_ci_low, max_ece, max_subgroup_ratio): the new version "
        "becomes champion only if it passes",
    ),
    (
        "--cohorts",
        "cohorts",
        str,
        "cohort CSV ('path' or MedMNIST 'index', optional 'patient_id', one column per "
        "attribute): the test split is audited per cohort and logged (ChestX-ray14: always, "
        "from its own metadata)",
    ),
    (
        "--crop",
        "crop",
        str,
        "center | none: how a larger input is cropped before it is reduced (default: the data "
        "set's own: MedMNIST's crop, none for folder and chestxray14 data sets)",
    ),
    (
        "--calibration",
        "calibration",
        str,
        "temperature (fitted on val by NLL; the exported model returns calibrated "
        "probabilities) | none",
    ),
    ("--workers", "workers", int, "Ray Train workers"),
    ("--cpus-per-worker", "cpus_per_worker", float, "0: share the cluster's CPUs"),
    ("--gpus-per-worker", "gpus_per_worker", float, "> 0 trains on GPUs"),
    ("--ray-address", "ray_address", str, "join a cluster: auto, HOST:PORT or ray://HOST:10001"),
    ("--storage-path", "storage_path", str, "Ray checkpoints (shared storage on a cluster)"),
    (
        "--storage-endpoint",
        "storage_endpoint",
        str,
        "S3-compatible endpoint URL for an s3:// --storage-path (default $MEDIMG_S3_ENDPOINT, "
        "$AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL; none: AWS)",
    ),
    ("--num-to-keep", "num_to_keep", int, "checkpoints kept, best by val AUC"),
    (
        "--max-failures",
        "max_failures",
        int,
        "restarts from the last checkpoint after a worker dies",
    ),
    (
        "--tracking-uri",
        "tracking_uri",
        str,
        "MLflow (default $MLFLOW_TRACKING_URI or ./mlruns sqlite)",
    ),
    ("--experiment", "experiment", str, "MLflow experiment"),
]


def add_train_options(p: argparse.ArgumentParser) -> None:
    from training.config import TrainConfig

    defaults = TrainConfig.__dataclass_fields__
    for flag, name, kind, text in TRAIN_OPTIONS:
        default = defaults[name].default
        shown = f" (default {default!r})" if default not in ("", None) else ""
        p.add_argument(flag, dest=name, type=kind, default=None, help=f"{text}{shown}".strip())


def explicit_options(args: argparse.Namespace) -> dict:
    return {
        name: getattr(args, name)
        for _, name, _, _ in TRAIN_OPTIONS
        if getattr(args, name) is not None
    }


def train_config(args: argparse.Namespace):
    from training.recipes import build_config

    explicit = explicit_options(args)
    return build_config(explicit.pop("recipe", "") or "", **explicit)


def add_server_options(p: argparse.ArgumentParser) -> None:
    """The server's options (``ServerConfig``'s fields), for ``serve`` and ``pipeline``."""
    p.add_argument(
        "--repository",
        default=DEFAULT_REPOSITORY,
        help="Triton model repository (default %(default)s)",
    )
    p.add_argument(
        "--host",
        default=None,
        help="address to bind (default 127.0.0.1; any other address exposes the endpoints to "
        "the network)",
    )
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument(
        "--model-control-mode",
        choices=MODEL_CONTROL_MODES,
        default="none",
        help="explicit: load/unload through the repository API (what `medimg publish --url` "
        "uses); none: the repository as it was at start (default)",
    )
    p.add_argument(
        "--no-http-guard",
        action="store_true",
        help="serve Triton's own HTTP directly, without the validating proxy "
        "(serving/server/http_guard.py)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="HTTP guard: larger requests are refused (default 64 MiB)",
    )


def server_from_args(args: argparse.Namespace) -> TritonServer:
    """The server the options of :func:`add_server_options` describe (not started); warns on
    stderr when ``--host`` exposes it to the network."""
    from serving.server.process import TritonServer

    host = args.host or "127.0.0.1"  # another address only when --host names it
    if not is_loopback(host):
        print(
            f"warning: --host {host}: the HTTP, gRPC and metrics endpoints are reachable "
            "from the network, without authentication",
            file=sys.stderr,
            flush=True,
        )
    from training.errors import ConfigError

    endpoint = getattr(args, "s3_endpoint", "")  # serve's; tritonserver reads s3:// itself
    if endpoint and not args.repository.startswith("s3://"):
        raise ConfigError(
            f"--s3-endpoint {endpoint} needs an s3://BUCKET/PREFIX repository, "
            f"got {args.repository!r}"
        )
    remote = args.repository.startswith("s3://")
    config = ServerConfig(
        triton_s3_url(args.repository, endpoint) if remote else Path(args.repository),
        host=host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode,
        allow_public=args.host is not None,
        http_guard=not args.no_http_guard,
        max_request_bytes=args.max_request_bytes,
    )
    return TritonServer(config)


def add_repository_options(p: argparse.ArgumentParser) -> None:
    """How exported models batch, place and version (``serving.repository.model_config``)."""

    g = p.add_argument_group("model repository")
    g.add_argument(
        "--target",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: ONNX Runtime in the Python backend (embedded server); gpu: "
        "onnxruntime_onnx + TensorRT accelerator on KIND_GPU (official container)",
    )
    g.add_argument("--max-batch-size", type=int, default=32)
    g.add_argument(
        "--preferred-batch-sizes",
        type=levels_arg,
        default=None,
        help="the classifier's dynamic batching: the sizes the batcher cuts a queue "
        "into (default 8; '' for none: batches of whatever is queued)",
    )
    g.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=None,
        help="the classifier's dynamic batching: how long a batch short of a "
        "preferred size may wait for more requests (default 500; NAME_preprocess "
        "never waits)",
    )
    g.add_argument("--instances", type=int, default=2, help="classifier instances (default 2)")
    g.add_argument("--preprocess-instances", type=int, default=1)
    g.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="ONNX Runtime threads per instance (0: cores / instances)",
    )
    g.add_argument(
        "--no-borrow-idle-cores",
        action="store_true",
        help="--target cpu: an "
        "instance keeps its share of the cores even while the others are idle",
    )
    g.add_argument("--version-policy", default="latest:1", help="latest:N | all | specific:V,..")
    g.add_argument(
        "--trt-precision",
        choices=("FP16", "FP32"),
        default=None,
        help="--target gpu: the TensorRT accelerator's precision (default FP16)",
    )
    g.add_argument("--no-warmup", action="store_true", help="no model_warmup in the configs")
    g.add_argument(
        "--no-cam",
        action="store_true",
        help="no class-activation-map output (NAME_onnx with one output, as Triton's example "
        "image client expects; medimg explain then needs --local)",
    )
    g.add_argument(
        "--max-image-bytes",
        type=int,
        default=32 << 20,
        help="NAME_preprocess refuses larger encoded images with INVALID_ARG (default 32 MiB)",
    )


def repository_options(args: argparse.Namespace):
    from serving.repository.model_config import RepositoryOptions
    from training.errors import ConfigError

    if args.trt_precision and args.target != "gpu":
        raise ConfigError("--trt-precision applies to --target gpu only (TensorRT on the GPU)")
    if args.no_borrow_idle_cores and args.target != "cpu":
        raise ConfigError(
            "--no-borrow-idle-cores applies to --target cpu only (the Python backend's sessions)"
        )
    batching = {  # unset: RepositoryOptions' measured defaults
        k: v
        for k, v in (
            ("preferred_batch_sizes", args.preferred_batch_sizes),
            ("max_queue_delay_us", args.max_queue_delay_us),
        )
        if v is not None
    }
    return RepositoryOptions(
        target=args.target,
        max_batch_size=args.max_batch_size,
        **batching,
        instance_count=args.instances,
        preprocess_instance_count=args.preprocess_instances,
        intra_op_threads=args.intra_op_threads,
        borrow_idle_cores=not args.no_borrow_idle_cores,
        version_policy=args.version_policy,
        trt_precision=args.trt_precision or "FP16",
        warmup=not args.no_warmup,
        cam=not args.no_cam,
        max_image_bytes=args.max_image_bytes,
    )


def levels_arg(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def add_client_options(p: argparse.ArgumentParser) -> None:
    """The options every client command shares, with the same meaning and defaults."""
    p.add_argument(
        "paths",
        nargs="+",
        help="image files (PNG, JPEG, DICOM, .npy), directories, or MedMNIST .npz files",
    )
    p.add_argument(
        "--url", default="", help="HOST:PORT (default 127.0.0.1:8000 for http, :8001 for grpc)"
    )
    p.add_argument("--protocol", choices=PROTOCOLS, default="http")
    p.add_argument(
        "--model", default="", help="ensemble name (default: the only ensemble on the server)"
    )
    p.add_argument(
        "--client-preprocess",
        action="store_true",
        help="decode and preprocess here and send tensors (default: send the "
        "files' bytes to the server-side preprocessing ensemble)",
    )
    p.add_argument("--split", default="", help=".npz inputs: train|val|test (default test)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="images per request (default: the model's max_batch_size)",
    )
    p.add_argument("--in-flight", type=int, default=2, help="requests in flight (default 2)")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="binary models: label the finding when P(finding) >= P (default: the model's "
        "operating threshold, chosen on validation; see --json)",
    )
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request (default 60)")
