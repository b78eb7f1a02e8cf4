"""``medimg``: the one command-line tool.

medimg train --dataset pneumoniamnist --epochs 3
medimg export --model pneumoniamnist-densenet121
medimg serve --model-control-mode explicit
medimg publish --model pneumoniamnist-densenet121@champion --url 127.0.0.1:8000
medimg classify ../shared/data/samples --protocol grpc
medimg label ../shared/data/pneumoniamnist.npz --out labels.csv
medimg triage ../shared/data/samples --finding pneumonia
medimg pipeline --dataset pneumoniamnist --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from training.errors import MedimgError

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
    ("--cache-dir", "cache_dir", str, "decoded image cache (default ~/.cache/medimg)"),
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
    ("--class-weighting", "class_weighting", str, "none | balanced"),
    ("--sampler", "sampler", str, "shuffle | balanced"),
    ("--amp", "amp", str, "auto | bf16 | fp16 | off (CUDA only)"),
    (
        "--pretrained-weights",
        "pretrained_weights",
        str,
        "local DenseNet-121 .pth (ImageNet/CheXNet)",
    ),
    ("--model-name", "model_name", str, "registered/served name (default DATASET-densenet121)"),
    ("--seed", "seed", int, ""),
    ("--workers", "workers", int, "Ray Train workers"),
    ("--cpus-per-worker", "cpus_per_worker", float, "0: share the cluster's CPUs"),
    ("--gpus-per-worker", "gpus_per_worker", float, "> 0 trains on GPUs"),
    ("--ray-address", "ray_address", str, "join a cluster: auto, HOST:PORT or ray://HOST:10001"),
    ("--storage-path", "storage_path", str, "Ray checkpoints (shared storage on a cluster)"),
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


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from training.config import TrainConfig

    defaults = TrainConfig.__dataclass_fields__
    for flag, name, kind, text in TRAIN_OPTIONS:
        default = defaults[name].default
        shown = f" (default {default!r})" if default not in ("", None) else ""
        p.add_argument(flag, dest=name, type=kind, default=None, help=f"{text}{shown}".strip())


def _explicit_options(args: argparse.Namespace) -> dict:
    return {
        name: getattr(args, name)
        for _, name, _, _ in TRAIN_OPTIONS
        if getattr(args, name) is not None
    }


def _train_config(args: argparse.Namespace):
    from training.recipes import build_config

    explicit = _explicit_options(args)
    return build_config(explicit.pop("recipe", "") or "", **explicit)


def _add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--repository",
        default=DEFAULT_REPOSITORY,
        help="Triton model repository (default %(default)s)",
    )
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; any "
                   "other address exposes the endpoints to the network)")  # fmt: skip
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument(
        "--model-control-mode",
        choices=("none", "poll", "explicit"),
        default="none",
        help="explicit: load/unload through the repository API (what `medimg publish --url` "
        "uses); none: the repository as it was at start (default)",
    )
    p.add_argument("--no-http-guard", action="store_true", help="serve Triton's own HTTP "
                   "directly, without the validating proxy (serving/http_guard.py)")  # fmt: skip
    p.add_argument("--max-request-bytes", type=int, default=64 << 20,
                   help="HTTP guard: larger requests are refused (default 64 MiB)")  # fmt: skip


def _server(args: argparse.Namespace):
    from serving.server import TritonServer, is_loopback

    host = args.host or "127.0.0.1"  # another address only when --host names it
    if not is_loopback(host):
        print(f"warning: --host {host}: the HTTP, gRPC and metrics endpoints are reachable "
              "from the network, without authentication", file=sys.stderr, flush=True)  # fmt: skip
    return TritonServer(
        Path(args.repository),
        host=host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode,
        allow_public=args.host is not None,
        http_guard=not args.no_http_guard,
        max_request_bytes=args.max_request_bytes,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from training.run import train_and_register

    if args.resume:
        from training.config import default_tracking_uri
        from training.run import resume_config

        explicit = _explicit_options(args)
        uri = explicit.pop("tracking_uri", "") or default_tracking_uri()
        cfg, target = resume_config(uri, args.resume, explicit)
        outcome = train_and_register(cfg, target)
    else:
        outcome = train_and_register(_train_config(args))
    print(f"MLflow run: {outcome.run_id}")
    print(f"registered: {outcome.model_name} version {outcome.version}")
    print(f"val  AUC {outcome.val['auc']:.4f}  ACC {outcome.val['acc']:.4f}")
    print(f"test AUC {outcome.test['auc']:.4f}  ACC {outcome.test['acc']:.4f}")
    if outcome.clinical.get("markdown"):
        print(outcome.clinical["markdown"])
    print(outcome.champion)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from serving.export import export_model
    from training.config import default_data_dir, default_tracking_uri
    from training.registry import load_model, resolve_model_uri

    options = repository_options(args)  # bad options fail before any MLflow or ONNX work
    tracking_uri = args.tracking_uri or default_tracking_uri()
    uri, what = resolve_model_uri(tracking_uri, model=args.model or "", run_id=args.run_id or "")
    report = export_model(
        load_model(tracking_uri, uri),
        Path(args.repository),
        data_dir=args.data_dir or default_data_dir(),
        options=options,
        version=args.version,
        fp16=args.fp16,
    )
    fp16 = f"; fp16 vs fp32 max abs diff {report.fp16_max_abs_diff:.2e}" if args.fp16 else ""
    print(
        f"exported {what} -> {', '.join(report.models.names)} version {report.version} in "
        f"{args.repository} (--target {args.target}; ONNX parity max abs diff "
        f"{report.max_abs_diff:.2e} at batch sizes {list(report.parity_batches)}{fp16})"
    )
    if args.target == "gpu":
        from serving.engine_repository import build_step_script

        script = build_step_script(Path(args.repository), report.model_dir.name, report.version)
        print(f"TensorRT plan: run {script} on the GPU host that serves this repository")
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from serving.engine_repository import build_in_repository
    from training.config import default_data_dir

    built = build_in_repository(
        Path(args.repository),
        args.model,
        data_dir=args.data_dir or default_data_dir(),
        version=args.version,
        fp16=not args.fp32,
        int8_images=args.int8_images,
        use_in_ensemble=args.use_in_ensemble,
    )
    print(
        f"built {built.model_dir.name} version {built.version} in {built.seconds:.0f} s: "
        f"top-1 agreement with ONNX Runtime {built.top1_agreement:.3f}, "
        f"max abs diff {built.max_abs_diff:.2e}"
    )
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from serving.publish import publish
    from training.config import default_data_dir, default_tracking_uri

    options = repository_options(args)
    published = publish(
        args.model,
        args.repository,
        tracking_uri=args.tracking_uri or default_tracking_uri(),
        data_dir=args.data_dir or default_data_dir(),
        options=options,
        url=args.url,
        s3_endpoint=args.s3_endpoint or None,
    )
    print(
        f"published {published.what} as version {published.version} of "
        f"{', '.join(published.models)} in {published.repository} "
        f"(ONNX parity max abs diff {published.report.max_abs_diff:.2e})"
    )
    if published.serving is not None:
        print(f"{args.url} now serves {published.models[1]} version(s) {published.serving}")
    return 0


def add_repository_options(p: argparse.ArgumentParser) -> None:
    """How exported models batch, place and version (``serving.model_configs``)."""
    from serving.bench import levels_arg as int_list

    g = p.add_argument_group("model repository")
    g.add_argument("--target", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: ONNX Runtime in the Python backend (embedded server); gpu: "
                   "onnxruntime_onnx + TensorRT accelerator on KIND_GPU (official container)")  # fmt: skip
    g.add_argument("--max-batch-size", type=int, default=32)
    g.add_argument("--preferred-batch-sizes", type=int_list, default=None,
                   help="the classifier's dynamic batching: the sizes the batcher cuts a queue "
                   "into (default 8; '' for none: batches of whatever is queued)")  # fmt: skip
    g.add_argument("--max-queue-delay-us", type=int, default=None,
                   help="the classifier's dynamic batching: how long a batch short of a "
                   "preferred size may wait for more requests (default 500; NAME_preprocess "
                   "never waits)")  # fmt: skip
    g.add_argument("--instances", type=int, default=2, help="classifier instances (default 2)")
    g.add_argument("--preprocess-instances", type=int, default=1)
    g.add_argument("--intra-op-threads", type=int, default=0,
                   help="ONNX Runtime threads per instance (0: cores / instances)")  # fmt: skip
    g.add_argument("--no-borrow-idle-cores", action="store_true", help="--target cpu: an "
                   "instance keeps its share of the cores even while the others are idle")  # fmt: skip
    g.add_argument("--version-policy", default="latest:1", help="latest:N | all | specific:V,..")
    g.add_argument("--trt-precision", choices=("FP16", "FP32"), default=None,
                   help="--target gpu: the TensorRT accelerator's precision (default FP16)")  # fmt: skip
    g.add_argument("--no-warmup", action="store_true", help="no model_warmup in the configs")
    g.add_argument("--max-image-bytes", type=int, default=32 << 20, help="NAME_preprocess "
                   "refuses larger encoded images with INVALID_ARG (default 32 MiB)")  # fmt: skip


def repository_options(args: argparse.Namespace):
    from serving.model_configs import RepositoryOptions
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
        max_image_bytes=args.max_image_bytes,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.server import serve_foreground

    def ready(server) -> None:
        guard = f" (guarded, max {server.max_request_bytes} bytes)" if server.http_guard else ""
        print(
            f"Triton ready: HTTP {server.http_url}{guard}  gRPC {server.grpc_url}  "
            f"metrics {server.metrics_url}",
            flush=True,
        )
        if server.token_file is not None:
            print(
                f"model load/unload need the repository token in {server.token_file} "
                "(medimg publish --url reads it there)",
                flush=True,
            )

    return serve_foreground(_server(args), on_ready=ready)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from serving.pipeline import run_pipeline

    return run_pipeline(_train_config(args), _server(args), keep_serving=args.keep_serving)


def cmd_tune(args: argparse.Namespace) -> int:
    from training.tune import TuneSettings, resume_tune, run_tune

    if args.resume:
        ignored = sorted(_explicit_options(args))
        if ignored:
            from training.errors import ConfigError

            raise ConfigError(
                f"tune --resume continues the job with its own saved options; drop {ignored}"
            )
        outcome = resume_tune(args.resume)
    else:
        settings = TuneSettings(
            samples=args.samples,
            max_concurrent=args.max_concurrent,
            search=args.search,
            trial_scheduler=args.trial_scheduler,
            time_budget_s=args.time_budget_s,
            space_file=args.space,
        )
        outcome = run_tune(_train_config(args), settings)
    print(outcome.report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from serving import bench, client_commands, tune_server

    parser = argparse.ArgumentParser(
        prog="medimg",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train DenseNet-121 with Ray Train, track and register in MLflow"
    )
    _add_train_options(p)
    p.add_argument(
        "--resume",
        default="",
        help="continue a stopped run: MLflow run id, Ray run directory or checkpoint directory",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export", help="export a registered model to ONNX and a Triton model repository"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="NAME, NAME/VERSION or NAME@ALIAS of a registered model")
    which.add_argument("--run-id", help="MLflow run id of a training run")
    p.add_argument("--repository", default=DEFAULT_REPOSITORY, help="(default %(default)s)")
    p.add_argument("--tracking-uri", default="")
    p.add_argument(
        "--data-dir", default="", help="real images for the parity check (the model's data set)"
    )
    p.add_argument("--version", type=int, default=None, help="(default: the next version)")
    p.add_argument("--fp16", action="store_true", help="serve a float16 ONNX variant "
                   "(checked against the fp32 one; float32 inputs and outputs)")  # fmt: skip
    add_repository_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "build-engine",
        help="build a TensorRT plan (NAME_trt) from NAME_onnx, on the GPU host that serves it",
    )
    p.add_argument("--repository", default=DEFAULT_REPOSITORY)
    p.add_argument("--model", required=True, help="the ensemble's NAME")
    p.add_argument("--version", type=int, default=None, help="of NAME_onnx (default: newest)")
    p.add_argument("--fp32", action="store_true", help="no FP16 kernels")
    p.add_argument("--int8-images", type=int, default=0, help="INT8 with entropy "
                   "calibration on N validation images (0: no INT8)")  # fmt: skip
    p.add_argument("--data-dir", default="", help="the model's data set: parity and calibration")
    p.add_argument("--use-in-ensemble", action="store_true", help="route NAME through NAME_trt")
    p.set_defaults(func=cmd_build_engine)

    p = sub.add_parser(
        "publish",
        help="export a registered model as the next version of a Triton repository "
        "(local or s3://) and load it on a running server",
    )
    p.add_argument("--model", default="", help="NAME@ALIAS or NAME/VERSION (default: the "
                   "only registered model's @champion)")  # fmt: skip
    p.add_argument("--repository", default=DEFAULT_REPOSITORY, help="DIR or s3://bucket/prefix")
    p.add_argument("--url", default="", help="HOST:PORT (HTTP) of a server in "
                   "--model-control-mode explicit: load the new version there")  # fmt: skip
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint URL "
                   "(default: AWS, or $AWS_ENDPOINT_URL)")  # fmt: skip
    p.add_argument("--tracking-uri", default="")
    p.add_argument("--data-dir", default="", help="real images for the parity check")
    add_repository_options(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("serve", help="run the Triton server in the foreground")
    _add_server_options(p)
    p.set_defaults(func=cmd_serve)

    client_commands.add_parsers(sub)  # classify, label, triage
    bench.add_parser(sub)
    tune_server.add_parser(sub)

    p = sub.add_parser(
        "pipeline", help="train, register, export, serve and evaluate through Triton"
    )
    _add_train_options(p)
    _add_server_options(p)
    p.add_argument("--keep-serving", action="store_true", help="keep the server running afterwards")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune (ASHA, Optuna)")
    _add_train_options(p)  # the base config of every trial
    p.add_argument("--samples", type=int, default=8, help="trials (default %(default)s)")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials at once (default 1)")
    p.add_argument("--search", choices=("optuna", "random"), default="optuna", help="TPE or random")
    p.add_argument("--trial-scheduler", choices=("asha", "none"), default="asha",
                   help="asha: stop poor trials after each epoch")  # fmt: skip
    p.add_argument("--time-budget-s", type=float, default=0.0, help="stop after S s (0: none)")
    p.add_argument("--space", default="", help="YAML/JSON search space (default: lr, weight "
                   "decay, batch size, optimizer, aug strength, image size)")  # fmt: skip
    p.add_argument("--resume", default="", help="continue a stopped job: its Tune folder "
                   "(the job's own options are used)")  # fmt: skip
    p.set_defaults(func=cmd_tune)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("training", "serving"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except MedimgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
