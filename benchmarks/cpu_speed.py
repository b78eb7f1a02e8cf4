"""CPU training speed of DenseNet-121, side by side: each option's forward + backward +
optimizer step in images/s at 64 and 224 px, in ALTERNATING ROUNDS in one process
(a noisy machine slows every option alike), medians with per-round ranges, and the ratio
to fp32 in the same round.

Options: ``fp32`` (the baseline), ``channels_last``, ``bf16`` (CPU autocast),
``bf16+channels_last``, ``compile`` (``torch.compile``, its compile time reported
apart) and ``threads=1`` (one intra-op thread instead of all). Then where a real epoch's
time goes beyond the step: the loader, the batched augmentation and the per-step
bookkeeping of ``training.epoch.run_epoch``, measured on the same batches::

    python benchmarks/cpu_speed.py --rounds 3 --steps 4 --data-dir ../shared/data
    python benchmarks/cpu_speed.py --sizes 64 --options fp32,bf16 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch

from training.config import TrainConfig
from training.epoch import make_optimizer
from training.model import build_model
from training.precision import cpu_supports_bf16

OPTIONS = ("fp32", "channels_last", "bf16", "bf16+channels_last", "compile", "threads=1")


class Step:
    """One option's model, optimizer and training step on a fixed batch."""

    def __init__(self, option: str, size: int, batch: int, threads: int) -> None:
        torch.manual_seed(0)
        self.option, self.threads = option, threads
        self.channels_last = "channels_last" in option
        self.bf16 = option.startswith("bf16")
        model = build_model(1, 2)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if option == "compile" else model
        self.optimizer = make_optimizer(TrainConfig(), model.parameters())
        self.loss = torch.nn.CrossEntropyLoss()
        x = torch.randn(batch, 1, size, size)
        self.x = x.to(memory_format=torch.channels_last) if self.channels_last else x
        self.y = torch.randint(0, 2, (batch,))
        self.compile_s = 0.0
        if option == "compile":
            started = time.perf_counter()
            self()
            self.compile_s = time.perf_counter() - started

    def __call__(self) -> None:
        torch.set_num_threads(1 if self.option == "threads=1" else self.threads)
        cast = (
            torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        )
        with cast:
            loss = self.loss(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        torch.set_num_threads(self.threads)


def images_per_s(step: Callable[[], None], steps: int, batch: int) -> float:
    step()  # warm-up (oneDNN primitive creation, allocator)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - started)


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


def speed_table(sizes: list[int], options: list[str], rounds: int, steps: int) -> None:
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, CPU bf16: {cpu_supports_bf16()}")
    print("| px | batch | option | images/s | / fp32 (same round) | compile s |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for size in sizes:
        batch = 32 if size <= 64 else 8
        built = {o: Step(o, size, batch, threads) for o in options}
        rates: dict[str, list[float]] = {o: [] for o in options}
        for _ in range(rounds):
            for option in options:
                rates[option].append(images_per_s(built[option], steps, batch))
        base = rates.get("fp32")
        for option in options:
            ratio = (
                _spread([r / b for r, b in zip(rates[option], base, strict=True)], ".2f")
                if base
                else "-"
            )
            compile_s = f"{built[option].compile_s:.0f}" if option == "compile" else ""
            print(
                f"| {size} | {batch} | {option} | {_spread(rates[option], '.1f')} | {ratio} "
                f"| {compile_s} |",
                flush=True,
            )


def epoch_anatomy(data_dir: str, precision: str, augment: str, max_samples: int) -> None:
    """Where a real epoch's time goes: the loader alone, the loader plus the batched
    augmentation, the training step alone on the same batches, and ``run_epoch`` whole."""
    from torch.utils.data import DataLoader

    from training.augment import BatchTransform
    from training.data import DataOptions, open_split
    from training.epoch import make_loss, make_sampler, run_epoch
    from training.precision import resolve
    from training.spec import ModelSpec

    cfg = TrainConfig(
        data_dir=data_dir, augment=augment, precision=precision, max_train_samples=max_samples
    )
    spec = ModelSpec.for_config(cfg)
    train = open_split(
        DataOptions.from_config(cfg),
        "train",
        image_size=cfg.image_size,
        channels=spec.channels,
        max_samples=max_samples,
    )
    loader = DataLoader(
        train,
        batch_size=cfg.batch_size,
        sampler=make_sampler(cfg, train.labels, train, 0, 1),
        drop_last=True,
    )
    transform = BatchTransform(cfg.augmentations, cfg.aug_strength, spec.mean, spec.std)
    prec = resolve(cfg, torch.device("cpu"))
    model = build_model(spec.channels, spec.num_classes).to(memory_format=prec.memory_format)
    optimizer = make_optimizer(cfg, model.parameters())
    loss_fn = make_loss(cfg, spec, train.labels)
    images = len(loader) * cfg.batch_size

    def timed(fn: Callable[[], object]) -> float:
        started = time.perf_counter()
        fn()
        return images / (time.perf_counter() - started)

    batches = [(x, y) for x, y in loader]
    inputs = [
        transform(x, train=True).contiguous(memory_format=prec.memory_format) for x, _ in batches
    ]
    autocast = prec.autocast()

    def steps() -> None:
        for x, (_, y) in zip(inputs, batches, strict=True):
            with autocast():
                loss = loss_fn(model(x), y[:, 0].long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()

    def epoch() -> None:
        run_epoch(
            model,
            loader,
            transform=lambda x: transform(x, train=True),
            loss_fn=loss_fn,
            optimizer=optimizer,
            spec=spec,
            device=torch.device("cpu"),
            autocast=autocast,
            memory_format=prec.memory_format,
        )

    steps()  # warm-up
    rows = {
        "loader": timed(lambda: [b for b in loader]),
        "loader + augmentation": timed(lambda: [transform(x, train=True) for x, _ in loader]),
        "training step alone": timed(steps),
        "run_epoch (all of it)": timed(epoch),
    }
    label = f"{prec.name}, augment {augment or 'none'}, {images} images of {cfg.image_size} px"
    print(f"\n| epoch anatomy ({label}) | images/s |\n| --- | ---: |")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,224")
    p.add_argument("--options", default=",".join(OPTIONS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per option per round")
    p.add_argument("--data-dir", default="", help="with it: the epoch anatomy on PneumoniaMNIST")
    p.add_argument("--anatomy-only", action="store_true", help="skip the speed table")
    args = p.parse_args()
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        p.error(f"--options: unknown {unknown}; known: {list(OPTIONS)}")
    if not args.anatomy_only:
        speed_table([int(s) for s in args.sizes.split(",")], options, args.rounds, args.steps)
    if args.data_dir:
        for precision in ("fp32", "auto"):
            for augment in ("", "hflip,affine"):
                epoch_anatomy(args.data_dir, precision, augment, 1024)


if __name__ == "__main__":
    main()
