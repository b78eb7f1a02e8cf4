"""The champion/challenger rule: a new registered version takes the MLflow alias ``champion``
only if its validation AUC is strictly higher than the current champion's.

The candidate's number is read from the run that produced it (``best_val_auc``); the
decision, both numbers and both versions are written to the candidate's run (tags
``champion_decision``, ``champion_previous_version``, ``champion_message`` and metric
``champion_previous_best_val_auc``) and to the version's tags, so the MLflow UI shows why.
Only a champion whose version, run or metric does not exist is replaced unread; an MLflow
error while reading it (a 503, a dropped connection) stops the decision instead::

    python -c "from training.champion import promote_if_better; \
print(promote_if_better('sqlite:///mlruns/mlflow.db', 'pneumoniamnist-densenet121', '3').message)"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from training.errors import RegistryError


@dataclass(frozen=True)
class ChampionDecision:
    promoted: bool
    candidate_version: str
    candidate_value: float
    champion_version: str | None  # the champion before the decision; None if there was none
    champion_value: float | None  # its metric; None if there was no champion or no value
    metric: str
    message: str


def _is_missing(exc: Exception) -> bool:
    """Whether an MLflow error says the thing asked for does not exist (HTTP 404 from the
    tracking server, or the same error code from a local store)."""
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _metric(client, model_name: str, version: str, metric: str, where: str) -> float | None:
    """``metric`` of the run behind a version; None if the version, its run or the value is
    missing, or the value is NaN. Any other failure (the server answering 500 or 503, a lost
    connection) raises :class:`RegistryError` naming it: a champion must not lose its alias
    because its number could not be read just now."""
    from mlflow.exceptions import MlflowException

    try:
        run_id = client.get_model_version(model_name, version).run_id
        value = client.get_run(run_id).data.metrics.get(metric) if run_id else None
    except (MlflowException, OSError) as exc:  # requests' errors are OSErrors
        if _is_missing(exc):
            return None
        raise RegistryError(
            f"{where}: cannot read {metric!r} of {model_name} version {version} "
            f"({type(exc).__name__}: {exc}); nothing was changed, try again"
        ) from exc
    return None if value is None or math.isnan(value) else float(value)


def promote_if_better(
    tracking_uri: str,
    model_name: str,
    version: str,
    *,
    metric: str = "best_val_auc",
    alias: str = "champion",
) -> ChampionDecision:
    """Give ``model_name`` version ``version`` the alias ``alias`` if its ``metric`` beats the
    current holder's (strictly); with no holder, it always does. A holder whose run or
    metric is gone is replaced (the message says so). Raises :class:`RegistryError`, with the
    alias left where it was, if the version is unknown, its run has no finite ``metric``, or
    MLflow fails to answer a read (anything but "does not exist")."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    where = f"MLflow at {tracking_uri}"
    try:
        candidate = client.get_model_version(model_name, str(version))
        holders = client.get_registered_model(model_name).aliases
    except Exception as exc:
        what = "no version" if _is_missing(exc) else "cannot read version"
        raise RegistryError(f"{where}: {what} {version!r} of model {model_name!r}: {exc}") from exc
    run_id = candidate.run_id
    value = _metric(client, model_name, str(version), metric, where)
    if value is None or not run_id:  # no run: no value either
        raise RegistryError(
            f"{where}: {model_name} version {version} (run {run_id or 'none'}) has no "
            f"finite metric {metric!r}, so it cannot be compared with the {alias!r}"
        )
    current = holders.get(alias)
    current = str(current) if current is not None else None
    current_value = None if current is None else _metric(client, model_name, current, metric, where)
    label = f"{model_name} version {version} ({metric} {value:.4f})"

    if current is None:
        promoted, decision = True, "promoted"
        message = f"{label} is the first {alias}: no version held the alias"
    elif current == str(version):
        promoted, decision = False, "already"
        message = f"{label} already holds the alias {alias!r}"
    elif current_value is None:
        promoted, decision = True, "promoted"
        message = f"{label} becomes {alias}: version {current} has no {metric} to compare"
    elif value > current_value:
        promoted, decision = True, "promoted"
        message = f"{label} becomes {alias}: it beats version {current} ({current_value:.4f})"
    else:
        promoted, decision = False, "kept"
        message = (
            f"{label} does not become {alias}: version {current} keeps it with "
            f"{current_value:.4f} (a challenger must be strictly higher)"
        )
    try:
        if promoted:
            client.set_registered_model_alias(model_name, alias, str(version))
        tags = {
            "champion_decision": decision,
            "champion_previous_version": current or "none",
            "champion_message": message,
        }
        for key, text in tags.items():
            client.set_tag(run_id, key, text)
            client.set_model_version_tag(model_name, str(version), key, text)
        if current_value is not None:
            client.log_metric(run_id, f"champion_previous_{metric}", current_value)
    except Exception as exc:
        raise RegistryError(
            f"{where}: cannot record the {alias} decision ({message}): {exc}"
        ) from exc
    return ChampionDecision(
        promoted=promoted,
        candidate_version=str(version),
        candidate_value=value,
        champion_version=current,
        champion_value=current_value,
        metric=metric,
        message=message,
    )
