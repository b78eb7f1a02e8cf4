"""``medimg export``, ``medimg build-engine`` and ``medimg publish``.

medimg export --model pneumoniamnist-densenet121
medimg build-engine --model pneumoniamnist-densenet121 --data-dir ../shared/data
medimg publish --model pneumoniamnist-densenet121@champion --url 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.cli.options import DEFAULT_REPOSITORY, add_repository_options, repository_options


def cmd_export(args: argparse.Namespace) -> int:
    from serving.export.onnx import export_model
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
        from serving.export.tensorrt_models import build_step_script

        script = build_step_script(Path(args.repository), report.model_dir.name, report.version)
        print(f"TensorRT plan: run {script} on the GPU host that serves this repository")
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from serving.export.tensorrt_models import build_in_repository
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
    from training.gate import Gate

    options = repository_options(args)
    published = publish(
        args.model,
        args.repository,
        tracking_uri=args.tracking_uri or default_tracking_uri(),
        data_dir=args.data_dir or default_data_dir(),
        options=options,
        url=args.url,
        s3_endpoint=args.s3_endpoint or None,
        gate=Gate.load(args.gate) if args.gate else None,
    )
    print(
        f"published {published.what} as version {published.version} of "
        f"{', '.join(published.models)} in {published.repository} "
        f"(ONNX parity max abs diff {published.report.max_abs_diff:.2e})"
    )
    if published.serving is not None:
        print(f"{args.url} now serves {published.models[1]} version(s) {published.serving}")
    return 0


def register(sub) -> None:
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
    p.add_argument(
        "--fp16",
        action="store_true",
        help="serve a float16 ONNX variant "
        "(checked against the fp32 one; float32 inputs and outputs)",
    )
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
    p.add_argument(
        "--int8-images",
        type=int,
        default=0,
        help="INT8 with entropy calibration on N validation images (0: no INT8)",
    )
    p.add_argument("--data-dir", default="", help="the model's data set: parity and calibration")
    p.add_argument("--use-in-ensemble", action="store_true", help="route NAME through NAME_trt")
    p.set_defaults(func=cmd_build_engine)

    p = sub.add_parser(
        "publish",
        help="export a registered model as the next version of a Triton repository "
        "(local or s3://) and load it on a running server",
    )
    p.add_argument(
        "--model",
        default="",
        help="NAME@ALIAS or NAME/VERSION (default: the only registered model's @champion)",
    )
    p.add_argument("--repository", default=DEFAULT_REPOSITORY, help="DIR or s3://bucket/prefix")
    p.add_argument(
        "--url",
        default="",
        help="HOST:PORT (HTTP) of a server in "
        "--model-control-mode explicit: load the new version there",
    )
    p.add_argument(
        "--s3-endpoint",
        default="",
        help="S3-compatible endpoint URL (default: AWS, or $AWS_ENDPOINT_URL)",
    )
    p.add_argument("--tracking-uri", default="")
    p.add_argument("--data-dir", default="", help="real images for the parity check")
    p.add_argument(
        "--gate",
        default="",
        help="YAML promotion gate (min_auc_ci_low, max_ece, max_subgroup_ratio): publish only "
        "a version whose run passes it",
    )
    add_repository_options(p)
    p.set_defaults(func=cmd_publish)
