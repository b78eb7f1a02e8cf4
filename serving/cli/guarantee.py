"""What ``medimg label`` and ``medimg triage`` share for their guaranteed thresholds: the
target and ``--delta`` checks, the model's review statistics (``training.review``), the
``<out>.json`` sidecar and the guarantee's wording::

    medimg label ../shared/data/pneumoniamnist.npz --out labels.csv --target-accuracy 0.95
    cat labels.csv.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from serving.clients.contract import ModelContract
from serving.repository.layout import write_atomic
from training.errors import ConfigError


def probability(value: float | None, flag: str, *, open_interval: bool = False) -> None:
    if value is None:
        return
    ok = 0.0 < value < 1.0 if open_interval else 0.0 <= value <= 1.0
    if not ok:
        span = "strictly between 0 and 1" if open_interval else "a probability in [0, 1]"
        raise ConfigError(f"{flag}: expected {span}, got {value}")


def delta_of(args: argparse.Namespace, targets: Sequence[str]) -> float:
    """``--delta`` (default 0.05), allowed only with one of ``targets``."""
    if args.delta is not None and all(getattr(args, t) is None for t in targets):
        flags = " or ".join(f"--{t.replace('_', '-')}" for t in targets)
        raise ConfigError(f"--delta: goes with {flags} (the chance the guarantee fails)")
    delta = 0.05 if args.delta is None else args.delta
    probability(delta, "--delta", open_interval=True)
    return delta


def model_review_statistics(contract: ModelContract, flag: str, instead: str) -> dict:
    """The model's review statistics, or a ConfigError saying why there are none."""
    spec, model = contract.spec, contract.model
    if spec.multi_label:
        raise ConfigError(
            f"{flag}: model {model!r} is {spec.task}; the guarantee is for single-label "
            f"tasks only, for now ({instead})"
        )
    if not spec.review:
        raise ConfigError(
            f"{flag}: model {model!r} has no review statistics (its version was trained "
            "before medimg kept them): retrain it and export the new version to get "
            f"guaranteed thresholds ({instead}); nothing was sent or written"
        )
    return spec.review


def unreachable(flag: str, model: str, exc: Exception) -> ConfigError:
    return ConfigError(f"{flag}: model {model!r}: {exc}; nothing was sent or written")


def sidecar(out: Path, info: dict, mode: int = 0o644) -> Path:
    """``<out>.json``: how ``out`` was made (the thresholds, the guarantee and its terms)."""
    path = out.with_name(out.name + ".json")
    write_atomic(path, (json.dumps(info, indent=2) + "\n").encode(), mode=mode)
    return path


def guarantee(what: str, delta: float, split: str) -> str:
    return (
        f"with probability >= {1 - delta:g}, {what}, if the images are exchangeable with "
        f"the model's {split} split (a statement about the expected rate, not every batch)"
    )


def add_delta(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--delta",
        type=float,
        default=None,
        help="with a target: the chance that the guarantee fails (default 0.05)",
    )
