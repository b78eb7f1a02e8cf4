"""Search spaces for ``medimg tune``: a mapping of :class:`~training.config.TrainConfig`
field → distribution, read from YAML or JSON and checked before any trial runs.

Each entry is ``{"type": "loguniform" | "uniform", "lower": a, "upper": b}``,
``{"type": "randint", "lower": a, "upper": b}`` (both ends included) or
``{"type": "choice", "values": [...]}``. Every bound and choice must itself be a valid
value of the field (``TrainConfig.validate``), so a bad space fails before Ray starts::

    python -c "from training.search_space import DEFAULT_SPACE, parse_space; \
from training.config import TrainConfig; print(parse_space(DEFAULT_SPACE, TrainConfig()))"
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.errors import ConfigError, MedimgError

# Fixed for the whole tuning job: resources, budget, where things are stored and tracked.
FIXED_FIELDS = {
    "dataset": "--dataset",
    "data_dir": "--data-dir",
    "cache_dir": "--cache-dir",
    "model_name": "--model-name",
    "epochs": "--epochs (the per-trial budget; ASHA stops poor trials earlier)",
    "workers": "--workers",
    "cpus_per_worker": "--cpus-per-worker",
    "gpus_per_worker": "--gpus-per-worker",
    "use_gpu": "--gpus-per-worker",
    "ray_address": "--ray-address",
    "storage_path": "--storage-path",
    "storage_endpoint": "--storage-endpoint",
    "gate": "--gate",
    "cohorts": "--cohorts",
    "crop": "--crop",
    "calibration": "--calibration",
    "positive_class": "--positive-class",
    "tracking_uri": "--tracking-uri",
    "experiment": "--experiment",
    "mlflow_run_id": "(set per trial)",
    "resume_from": "(not tunable)",
    "recipe": "--recipe",
    "num_to_keep": "--num-to-keep",
    "max_failures": "--max-failures",
}
TUNABLE = tuple(f.name for f in fields(TrainConfig) if f.name not in FIXED_FIELDS)
BOUNDS = ("lower", "upper")
KINDS: dict[str, tuple[str, ...]] = {
    "loguniform": BOUNDS,
    "uniform": BOUNDS,
    "randint": BOUNDS,
    "choice": ("values",),
}

# lr, weight decay, batch size, optimizer, augmentation strength and image size.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "loguniform", "lower": 1e-4, "upper": 1e-2},
    "weight_decay": {"type": "loguniform", "lower": 1e-6, "upper": 1e-3},
    "batch_size": {"type": "choice", "values": [16, 32, 64]},
    "optimizer": {"type": "choice", "values": ["adam", "adamw", "sgd"]},
    "aug_strength": {"type": "uniform", "lower": 0.0, "upper": 1.0},
    "image_size": {"type": "choice", "values": [32, 64, 96]},
}
DEFAULT_AUGMENT = "affine,contrast"  # when aug_strength is searched and --augment not given


@dataclass(frozen=True)
class Param:
    """One searched field and its distribution."""

    name: str
    kind: str
    lower: float = 0.0
    upper: float = 0.0
    values: tuple[Any, ...] = ()

    def to_tune(self):
        """The Ray Tune domain (Optuna's searcher converts these itself)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "randint":
            return tune.randint(int(self.lower), int(self.upper) + 1)  # Tune: upper excluded
        if self.kind == "loguniform":
            return tune.loguniform(self.lower, self.upper)
        return tune.uniform(self.lower, self.upper)

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name}: choice {list(self.values)}"
        return f"{self.name}: {self.kind} [{self.lower:g}, {self.upper:g}]"


def load_space(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a ``.yaml``/``.yml``/``.json`` search-space file."""
    import yaml

    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"search space {path}: cannot read it: {exc}") from exc
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"search space {path}: not valid YAML/JSON: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"search space {path}: expected a non-empty mapping of TrainConfig field -> "
            f'{{"type": ..., ...}}, got {type(raw).__name__}'
        )
    return raw


def _coerce(base: TrainConfig, name: str, value: Any, where: str) -> Any:
    """``value`` as the field's type (YAML reads ``1e-4`` as a string), valid for
    ``TrainConfig.validate``."""
    expected = type(getattr(base, name))
    if expected is float and not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(
            f"search space: {name} {where} {value!r} is a {type(value).__name__}; "
            f"{name} takes {expected.__name__} values"
        )
    try:
        replace(base, **{name: value})
    except MedimgError as exc:
        raise ConfigError(f"search space: {name} {where} {value!r} is invalid: {exc}") from exc
    return value


def _parse_entry(base: TrainConfig, name: str, spec: Any) -> Param:
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in KINDS:
        raise ConfigError(
            f"search space: {name}: expected a mapping with 'type' one of {sorted(KINDS)}, "
            f"got {spec!r}"
        )
    keys = set(spec) - {"type"}
    if keys != set(KINDS[kind]):
        raise ConfigError(
            f"search space: {name}: a {kind} takes exactly {list(KINDS[kind])}, got {sorted(keys)}"
        )
    if kind == "choice":
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search space: {name}: 'values' must be a non-empty list")
        values = [_coerce(base, name, value, "choice") for value in values]
        return Param(name, kind, values=tuple(values))
    if kind == "randint" and type(getattr(base, name)) is not int:
        raise ConfigError(f"search space: {name}: randint needs an int field")
    if kind != "randint" and type(getattr(base, name)) is not float:
        raise ConfigError(f"search space: {name}: {kind} needs a float field (use choice)")
    lower, upper = (_coerce(base, name, spec[b], b) for b in BOUNDS)
    if not lower < upper:
        raise ConfigError(f"search space: {name}: lower {lower!r} must be below upper {upper!r}")
    if kind == "loguniform" and lower <= 0:
        raise ConfigError(f"search space: {name}: loguniform needs lower > 0, got {lower!r}")
    return Param(name, kind, lower=lower, upper=upper)


def parse_space(raw: dict[str, Any], base: TrainConfig) -> dict[str, Param]:
    """Validated parameters; an unknown or job-wide key is a :class:`ConfigError` naming it
    and the tunable fields."""
    for name in raw:
        if name in FIXED_FIELDS:
            raise ConfigError(
                f"search space: {name!r} is fixed for the whole tuning job: set it with "
                f"{FIXED_FIELDS[name]}. Tunable fields: {', '.join(TUNABLE)}"
            )
        if name not in TUNABLE:
            raise ConfigError(
                f"search space: unknown key {name!r} (not a TrainConfig field). "
                f"Known keys: {', '.join(TUNABLE)}"
            )
    return {name: _parse_entry(base, name, spec) for name, spec in raw.items()}
