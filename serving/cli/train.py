"""``medimg train``, ``medimg tune`` and ``medimg pipeline``. Each prints one progress
display and its results; library output goes to the run's ``medimg.log`` (``-v``: the
console too), see ``training.console``.

medimg train --dataset pneumoniamnist --epochs 3
medimg tune --dataset pneumoniamnist --samples 8
medimg pipeline --dataset pneumoniamnist --data-dir ../shared/data
"""

from __future__ import annotations

import argparse

from serving.cli.options import (
    add_server_options,
    add_train_options,
    explicit_options,
    server_from_args,
    train_config,
)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = None if args.resume else train_config(args)  # bad options fail before Ray/torch load
    from training.console import RunConsole
    from training.driver import train_and_register

    with RunConsole("train", verbose=args.verbose) as console, console.quiet():
        if cfg is None:
            from training.config import default_tracking_uri
            from training.resume import resume_config

            explicit = explicit_options(args)
            uri = explicit.pop("tracking_uri", "") or default_tracking_uri()
            cfg, target = resume_config(uri, args.resume, explicit)
            outcome = train_and_register(cfg, target)
        else:
            outcome = train_and_register(cfg)
    print(f"MLflow run: {outcome.run_id}")
    print(f"registered: {outcome.model_name} version {outcome.version}")
    print(f"val  AUC {outcome.val['auc']:.4f}  ACC {outcome.val['acc']:.4f}")
    print(f"test AUC {outcome.test['auc']:.4f}  ACC {outcome.test['acc']:.4f}")
    if outcome.clinical.get("markdown"):
        print(outcome.clinical["markdown"])
    if outcome.calibration.get("markdown"):
        print(outcome.calibration["markdown"])
    print(outcome.champion)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    cfg, server = train_config(args), server_from_args(args)
    from serving.pipeline import run_pipeline
    from training.console import RunConsole

    with RunConsole("train", verbose=args.verbose) as console:
        return run_pipeline(cfg, server, keep_serving=args.keep_serving, console=console)


def cmd_tune(args: argparse.Namespace) -> int:
    if args.resume:
        ignored = sorted(set(explicit_options(args)) - {"storage_endpoint"})
        if ignored:
            from training.errors import ConfigError

            raise ConfigError(
                f"tune --resume continues the job with its own saved options; drop {ignored}"
            )
    cfg = None if args.resume else train_config(args)  # bad options fail before Ray/torch load
    from training.console import RunConsole
    from training.tune import TuneSettings, resume_tune, run_tune

    with RunConsole("tune", verbose=args.verbose) as console, console.quiet():
        if cfg is None:
            outcome = resume_tune(args.resume, getattr(args, "storage_endpoint", None) or "")
        else:
            settings = TuneSettings(
                samples=args.samples,
                max_concurrent=args.max_concurrent,
                search=args.search,
                trial_scheduler=args.trial_scheduler,
                time_budget_s=args.time_budget_s,
                space_file=args.space,
            )
            outcome = run_tune(cfg, settings)
    print(outcome.report())
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train DenseNet-121 with Ray Train, track and register in MLflow"
    )
    add_train_options(p)
    p.add_argument(
        "--resume",
        default="",
        help="continue a stopped run: MLflow run id, Ray run directory or checkpoint directory",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "pipeline", help="train, register, export, serve and evaluate through Triton"
    )
    add_train_options(p)
    add_server_options(p)
    p.add_argument("--keep-serving", action="store_true", help="keep the server running afterwards")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune (ASHA, Optuna)")
    add_train_options(p)  # the base config of every trial
    p.add_argument("--samples", type=int, default=8, help="trials (default %(default)s)")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials at once (default 1)")
    p.add_argument("--search", choices=("optuna", "random"), default="optuna", help="TPE or random")
    p.add_argument(
        "--trial-scheduler",
        choices=("asha", "none"),
        default="asha",
        help="asha: stop poor trials after each epoch",
    )
    p.add_argument("--time-budget-s", type=float, default=0.0, help="stop after S s (0: none)")
    p.add_argument(
        "--space",
        default="",
        help="YAML/JSON search space (default: lr, weight "
        "decay, batch size, optimizer, aug strength, image size)",
    )
    p.add_argument(
        "--resume",
        default="",
        help="continue a stopped job: its Tune folder (the job's own options are used)",
    )
    p.set_defaults(func=cmd_tune)
