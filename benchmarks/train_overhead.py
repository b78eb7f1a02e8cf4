"""Ray Train overhead: the same epochs through Ray Train (1 worker) and a plain PyTorch
loop, on the same data, model, optimizer and epoch function (``training.epoch.run_epoch``),
in ALTERNATING ROUNDS in one process (plain, Ray, plain, Ray, ...: a noisy machine slows
both alike), reported as medians with per-round ranges; plus the input pipeline's
images/s against the training step's.

With ``--with-task`` each round also runs the plain loop inside a plain Ray task, which
separates what any Ray worker process costs from what Ray Train adds. Prints each round,
then the median ratio of Ray's steady-state epoch time to the plain loop's (target
<= 1.05) and Ray's time outside the epochs (target <= 10 s), split into starting Ray
(``ray.init``), starting the worker group, the worker's setup, validation, checkpoints
and reports, the end of the run (the last report until ``fit()`` returns), and shutdown::

    python benchmarks/train_overhead.py --data-dir ../shared/data --epochs 3 \
        --max-train-samples 1024 --rounds 2 --with-task
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from training.augment import BatchTransform
from training.config import TrainConfig
from training.data import DataOptions, open_split
from training.epoch import Schedule, make_loss, make_optimizer, make_sampler, run_epoch
from training.model import build_model
from training.precision import resolve as resolve_precision
from training.spec import ModelSpec


def _train_split(cfg: TrainConfig, spec: ModelSpec):
    return open_split(
        DataOptions.from_config(cfg),
        "train",
        image_size=cfg.image_size,
        channels=spec.channels,
        max_samples=cfg.max_train_samples,
    )


def plain_epochs(cfg: TrainConfig) -> list[float]:
    """Seconds of ``run_epoch`` per epoch in this process, no Ray."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(int(cfg.cpus_per_worker))
    spec = ModelSpec.for_config(cfg)
    train = _train_split(cfg, spec)
    sampler = make_sampler(cfg, train.labels, train, 0, 1)
    loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    precision = resolve_precision(cfg, torch.device("cpu"))
    model = build_model(spec.channels, spec.num_classes).to(memory_format=precision.memory_format)
    optimizer = make_optimizer(cfg, model.parameters())
    schedule = Schedule(cfg, optimizer)
    transform = BatchTransform(cfg.augmentations, cfg.aug_strength, spec.mean, spec.std)
    loss_fn = make_loss(cfg, spec, train.labels)
    times = []
    for epoch in range(1, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        stats = run_epoch(
            model,
            loader,
            transform=lambda x: transform(x, train=True),
            loss_fn=loss_fn,
            optimizer=optimizer,
            spec=spec,
            device=torch.device("cpu"),
            autocast=precision.autocast(),
            memory_format=precision.memory_format,
        )
        schedule.step(0.0)
        times.append(stats.seconds)
        print(
            f"plain  epoch {epoch}: {stats.seconds:.1f} s "
            f"({stats.images / stats.seconds:.0f} img/s)"
        )
    return times


def input_pipeline_rate(cfg: TrainConfig, batches: int = 50) -> float:
    """Images/s of the loader plus the batched augmentation and normalisation alone."""
    spec = ModelSpec.for_config(cfg)
    train = _train_split(cfg, spec)
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    transform = BatchTransform(cfg.augmentations, cfg.aug_strength, spec.mean, spec.std)
    seen, started = 0, time.perf_counter()
    while seen < batches * cfg.batch_size:
        for x, _ in loader:
            transform(x, train=True)
            seen += len(x)
            if seen >= batches * cfg.batch_size:
                break
    return seen / (time.perf_counter() - started)


@dataclass
class RayRun:
    """One Ray Train run's steady epochs and where the rest of its wall time went."""

    epochs: list[float]  # run_epoch seconds (what the plain loop times too)
    wall: float  # ray.init to ray.shutdown returned
    parts: dict[str, float]  # the wall time outside the epochs, by phase

    @property
    def outside(self) -> float:
        return self.wall - sum(self.epochs)


def ray_epochs(cfg: TrainConfig) -> RayRun:
    """A Ray Train run started and shut down here, its wall time split into phases: starting
    Ray, the worker group (fit() until the loop function runs), the worker's setup (data,
    model), validation each epoch (work the plain loop does not do), checkpoints and
    reports, and shutdown."""
    import ray

    from training.driver import new_ray_run_name
    from training.ray_cluster import resolve_resources
    from training.ray_trainer import build_trainer, ray_timing

    started = time.perf_counter()
    cfg = resolve_resources(cfg)
    init = time.perf_counter() - started
    fit_at = time.time()
    result = build_trainer(cfg, new_ray_run_name(cfg)).fit()
    fitted, fit_end = time.perf_counter(), time.time()
    timing = ray_timing(result, fit_at, fit_end)  # what `medimg train` logs to MLflow
    history = result.metrics_dataframe
    times = [float(t) for t in history["train_time_s"]]
    for epoch, seconds in enumerate(times, start=1):
        print(f"ray    epoch {epoch}: {seconds:.1f} s")
    ray.shutdown()
    wall = time.perf_counter() - started
    parts = {
        "ray.init": init,
        "worker group start": timing["ray_worker_start_s"],
        "worker setup": float(history["setup_s"].iloc[0]),
        "validation": float(history["val_time_s"].sum()),
        "end of run (last report to fit() returned)": timing["ray_run_end_s"],
        "shutdown": time.perf_counter() - fitted,
    }
    parts["checkpoints and reports"] = wall - sum(times) - sum(parts.values())
    return RayRun(times, wall, parts)


def task_epochs(cfg: TrainConfig) -> list[float]:
    """The plain loop inside a Ray task on a new local instance: what running in a Ray
    worker process costs by itself, before anything Ray Train adds."""
    import ray

    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here.parent), str(here)])
    ray.init(
        address="local",
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    try:
        task = ray.remote(num_cpus=cfg.cpus_per_worker)(plain_epochs)
        return ray.get(task.remote(cfg))
    finally:
        ray.shutdown()


def _spread(values: list[float], fmt: str) -> str:
    """Median with the range over rounds."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="pneumoniamnist")
    p.add_argument("--data-dir", default="")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-train-samples", type=int, default=1024)
    p.add_argument("--augment", default="hflip,affine")
    p.add_argument("--storage-path", default="ray_results/benchmarks")
    p.add_argument("--rounds", type=int, default=3, help="alternating plain/Ray rounds")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp32 (both loops)")
    p.add_argument(
        "--with-task", action="store_true", help="also the plain loop inside a plain Ray task"
    )
    args = p.parse_args()
    cpus = max(1, torch.get_num_threads())
    cfg = TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=args.epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        max_train_samples=args.max_train_samples,
        augment=args.augment,
        cpus_per_worker=float(cpus),
        storage_path=args.storage_path,
        precision=args.precision,
        num_to_keep=args.epochs,  # Ray's metrics_dataframe holds the kept checkpoints' rows
    )
    # the first epoch includes warm-up in both; compare the steady-state epochs when there are any
    skip = 1 if args.epochs > 1 else 0
    ratios, task_ratios, fixed, plain_means = [], [], [], []
    parts: dict[str, list[float]] = {}
    print(
        "| round | plain epoch s | in a Ray task s | task/plain | Ray Train epoch s | "
        "Ray Train/plain | Ray Train outside the epochs s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in range(1, args.rounds + 1):
        p_mean = statistics.mean(plain_epochs(cfg)[skip:])
        t_cell = "-", "-"
        if args.with_task:
            t_mean = statistics.mean(task_epochs(cfg)[skip:])
            task_ratios.append(t_mean / p_mean)
            t_cell = f"{t_mean:.1f}", f"{task_ratios[-1]:.3f}"
        run = ray_epochs(TrainConfig.from_dict(cfg.to_dict()))
        r_mean = statistics.mean(run.epochs[skip:])
        ratios.append(r_mean / p_mean)
        fixed.append(run.outside)
        plain_means.append(p_mean)
        for name, seconds in run.parts.items():
            parts.setdefault(name, []).append(seconds)
        print(
            f"| {r} | {p_mean:.1f} | {t_cell[0]} | {t_cell[1]} | {r_mean:.1f} | "
            f"{ratios[-1]:.3f} | {fixed[-1]:.1f} |",
            flush=True,
        )
    if task_ratios:
        print(f"in a Ray task/plain: {_spread(task_ratios, '.3f')}")
    print("\n| Ray outside the epochs | seconds, median (range) |\n| --- | ---: |")
    for name, values in parts.items():
        print(f"| {name} | {_spread(values, '.1f')} |")
    images = args.max_train_samples // args.batch_size * args.batch_size
    step_rate = images / statistics.median(plain_means)
    input_rate = input_pipeline_rate(cfg)
    print(
        f"ray/plain epoch time: {_spread(ratios, '.3f')} over {args.rounds} rounds "
        f"(target <= 1.05); Ray outside the epochs: {_spread(fixed, '.1f')} s "
        f"(target <= 10)"
    )
    print(
        f"input pipeline {input_rate:.0f} img/s, training step {step_rate:.0f} img/s: "
        f"ratio {input_rate / step_rate:.1f} (target >= 3)"
    )


if __name__ == "__main__":
    main()
