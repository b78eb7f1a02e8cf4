"""The promotion gate: minimum evidence a model version needs before it becomes the
``champion`` (``train``, ``tune``) or is published (``publish``).

A gate is a small YAML (or JSON) file; every key is optional, unknown keys are an error::

    min_auc_ci_low: 0.90          # lower bound of the test AUROC's 95% bootstrap CI
    max_ece: 0.05                 # test ECE after calibration (15 equal-width bins)
    max_subgroup_ratio: 1.25      # every uncensored cohort's AUROC / the largest cohort's
                                  # within [1/x, x] (seismometer's fine band at 1.25)

The numbers are read from the MLflow run that produced the version (``test_auc_ci_low``,
``test_ece_after``) and its subgroup audits (``audit/<dataset>/audit.json``, written
by ``medimg audit``). A number that is
missing fails its check, saying why: a gate never passes on evidence it did not see::

    python -c "from training.gate import Gate; print(Gate(min_auc_ci_low=0.9).check({'test_auc_ci_low': 0.93}).message)"
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from training.errors import ConfigError

AUDIT_DIR = "audit"  # medimg audit logs audit/<dataset>/audit.json to the version's run
RATIO_METRIC = "auroc"  # the audit's name (training.audit.METRICS) of the ratio gated on


@dataclass(frozen=True)
class Check:
    name: str
    limit: float
    value: float | None  # None: the number was not found
    passed: bool
    why: str  # the sentence printed for it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    checks: tuple[Check, ...]
    source: str  # the gate file

    @property
    def message(self) -> str:
        head = f"gate {self.source or '(inline)'}: {'PASSED' if self.passed else 'FAILED'}"
        return "\n".join(
            [head, *(f"  {'ok  ' if c.passed else 'FAIL'} {c.why}" for c in self.checks)]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "source": self.source,
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True)
class Gate:
    min_auc_ci_low: float | None = None
    max_ece: float | None = None
    max_subgroup_ratio: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for name, ok, expected in (
            (
                "min_auc_ci_low",
                self.min_auc_ci_low is None or 0 <= self.min_auc_ci_low <= 1,
                "in [0, 1]",
            ),
            ("max_ece", self.max_ece is None or 0 <= self.max_ece <= 1, "in [0, 1]"),
            (
                "max_subgroup_ratio",
                self.max_subgroup_ratio is None or self.max_subgroup_ratio >= 1,
                ">= 1",
            ),
        ):
            if not ok:
                raise ConfigError(
                    f"gate {self.source}: {name} expected {expected}, got {getattr(self, name)!r}"
                )

    @classmethod
    def load(cls, path: str | Path) -> Gate:
        """The gate in a YAML/JSON file; a missing file, bad syntax, an unknown key or a
        non-number is a :class:`ConfigError` naming the file and the key."""
        import yaml

        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"gate: cannot read {path}: {exc}") from exc
        try:
            raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"gate {path}: not valid YAML/JSON: {exc}") from exc
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(
                f"gate {path}: expected a mapping of criteria, got {type(raw).__name__}"
            )
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"gate {path}: unknown key(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"gate {path}: {key} expected a number, got {value!r}")
            values[key] = float(value)
        return cls(**values, source=str(path))

    def check(self, metrics: dict[str, float], audit: dict | None = None) -> GateDecision:
        """Each criterion against ``metrics`` (an MLflow run's) and ``audit`` (the subgroup
        audit's JSON, ``training.audit_report``'s format)."""
        checks = []
        if self.min_auc_ci_low is not None:
            v = _number(metrics.get("test_auc_ci_low"))
            checks.append(
                _check(
                    "min_auc_ci_low",
                    self.min_auc_ci_low,
                    v,
                    v is not None and v >= self.min_auc_ci_low,
                    "test AUROC 95% CI lower bound",
                    ">=",
                )
            )
        if self.max_ece is not None:
            v = _number(metrics.get("test_ece_after"))
            checks.append(
                _check(
                    "max_ece",
                    self.max_ece,
                    v,
                    v is not None and v <= self.max_ece,
                    "test ECE after calibration",
                    "<=",
                )
            )
        if self.max_subgroup_ratio is not None:
            checks.append(self._subgroups(audit))
        if not checks:
            raise ConfigError(f"gate {self.source}: no criterion set")
        return GateDecision(all(c.passed for c in checks), tuple(checks), self.source)

    def _subgroups(self, audit: dict | None) -> Check:
        limit = float(self.max_subgroup_ratio or 1.0)
        ratios = [] if not audit else list(subgroup_ratios(audit))
        if not ratios:
            why = (
                "no subgroup audit with an uncensored cohort for this version (run `medimg audit`)"
            )
            return Check("max_subgroup_ratio", limit, None, False, f"subgroup AUROC ratio: {why}")
        worst_name, worst = max(ratios, key=lambda r: max(r[1], 1 / r[1]) if r[1] > 0 else math.inf)
        spread = max(worst, 1 / worst) if worst > 0 else math.inf
        ok = spread <= limit
        where = "within" if ok else "outside"
        why = f"worst subgroup AUROC ratio {worst:.3f} ({worst_name}) {where} [1/{limit:g}, {limit:g}]"
        return Check("max_subgroup_ratio", limit, worst, ok, why)


def subgroup_ratios(audit: dict):
    """(cohort, ratio of its AUROC to its reference cohort's) for every uncensored cohort
    with a finite ratio, from ``training.audit.AuditResult.to_dict()`` (``rows``:
    ``attribute``, ``value``, ``censored``, ``ratios``: {metric: estimate})."""
    for row in audit.get("rows", []):
        ratio = (row.get("ratios") or {}).get(RATIO_METRIC)
        value = ratio.get("value") if isinstance(ratio, dict) else ratio
        if isinstance(value, int | float) and math.isfinite(value) and not row.get("censored"):
            yield f"{row.get('attribute', '?')}={row.get('value', '?')}", float(value)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _check(name: str, limit: float, value: float | None, ok: bool, what: str, op: str) -> Check:
    got = "not found in the run" if value is None else f"{value:.4f}"
    return Check(name, limit, value, ok, f"{what} {got} (required {op} {limit:g})")


def log_decision(decision: GateDecision, run_id: str, tracking_uri: str) -> None:
    """The decision as tags, metrics and ``gate/decision.json`` on the run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_tag(run_id, "gate_decision", "passed" if decision.passed else "failed")
    client.set_tag(run_id, "gate_source", decision.source)
    for c in decision.checks:
        if c.value is not None:
            client.log_metric(run_id, f"gate_{c.name}_value", c.value)
    client.log_dict(run_id, decision.to_dict(), "gate/decision.json")


def check_version(gate: Gate, tracking_uri: str, model_uri: str) -> GateDecision:
    """The gate against the run behind ``models:/NAME/VERSION``; the decision is logged."""
    from mlflow import MlflowClient

    name, version = model_uri.removeprefix("models:/").rsplit("/", 1)
    run_id = MlflowClient(tracking_uri=tracking_uri).get_model_version(name, version).run_id
    if not run_id:
        raise ConfigError(f"gate: {name} version {version} has no MLflow run to read evidence from")
    decision = gate.check(*run_evidence(tracking_uri, run_id))
    log_decision(decision, run_id, tracking_uri)
    return decision


def run_audits(tracking_uri: str, run_id: str) -> dict[str, dict]:
    """{data set: audit JSON} of every ``audit/<dataset>/audit.json`` logged to a run."""
    import mlflow
    from mlflow import MlflowClient

    client, audits = MlflowClient(tracking_uri=tracking_uri), {}
    for folder in client.list_artifacts(run_id, AUDIT_DIR):
        if folder.is_dir:
            try:
                text = mlflow.artifacts.load_text(f"runs:/{run_id}/{folder.path}/audit.json")
            except Exception:  # a folder without an audit.json
                continue
            audits[folder.path.split("/")[-1]] = json.loads(text)
    return audits


def run_evidence(tracking_uri: str, run_id: str) -> tuple[dict[str, float], dict | None]:
    """(metrics, the run's audits merged into one ``rows`` list, or None) of an MLflow run."""
    from mlflow import MlflowClient

    metrics = dict(MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.metrics)
    audits = run_audits(tracking_uri, run_id)
    rows = [row for audit in audits.values() for row in audit.get("rows", [])]
    return metrics, ({"rows": rows} if audits else None)
