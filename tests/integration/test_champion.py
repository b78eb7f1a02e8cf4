"""The champion alias against a real MLflow SQLite store: first version, worse, better, equal."""

from __future__ import annotations

import itertools

import pytest

from training.champion import promote_if_better
from training.errors import RegistryError

_names = itertools.count()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import mlflow

    from training.registry import ensure_experiment

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield uri, ensure_experiment(uri, "champion-test")
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def model(store):
    """A fresh registered model name and a function registering a version with a val AUC."""
    import mlflow
    from mlflow import MlflowClient

    uri, experiment_id = store
    client = MlflowClient(tracking_uri=uri)
    name = f"toy-{next(_names)}"
    client.create_registered_model(name)

    def register(auc: float | None) -> tuple[str, str]:
        with mlflow.start_run(experiment_id=experiment_id) as run:
            if auc is not None:
                mlflow.log_metric("best_val_auc", auc)
            mlflow.log_text("a tiny stand-in for a model", "model/README.txt")
        source = f"{run.info.artifact_uri}/model"
        version = client.create_model_version(name, source, run_id=run.info.run_id).version
        return str(version), run.info.run_id

    return uri, name, client, register


def _holder(client, name: str) -> str | None:
    holder = client.get_registered_model(name).aliases.get("champion")  # an int in MLflow 3
    return None if holder is None else str(holder)


def test_first_version_becomes_champion(model):
    uri, name, client, register = model
    version, run_id = register(0.91)
    decision = promote_if_better(uri, name, version)
    assert decision.promoted and decision.champion_version is None
    assert decision.candidate_value == pytest.approx(0.91)
    assert _holder(client, name) == version
    assert "0.9100" in decision.message and "first champion" in decision.message
    tags = client.get_run(run_id).data.tags
    assert tags["champion_decision"] == "promoted"
    assert tags["champion_previous_version"] == "none"


def test_worse_keeps_the_champion_better_takes_it_equal_does_not(model):
    uri, name, client, register = model
    v1, _ = register(0.90)
    promote_if_better(uri, name, v1)

    v2, run2 = register(0.85)
    worse = promote_if_better(uri, name, v2)
    assert not worse.promoted and _holder(client, name) == v1
    assert (worse.champion_version, worse.champion_value) == (v1, pytest.approx(0.90))
    assert "0.8500" in worse.message and "0.9000" in worse.message
    run = client.get_run(run2).data
    assert run.tags["champion_decision"] == "kept"
    assert run.tags["champion_previous_version"] == v1
    assert run.tags["champion_message"] == worse.message
    assert run.metrics["champion_previous_best_val_auc"] == pytest.approx(0.90)
    assert client.get_model_version(name, v2).tags["champion_decision"] == "kept"

    v3, run3 = register(0.95)
    better = promote_if_better(uri, name, v3)
    assert better.promoted and _holder(client, name) == v3
    assert (better.champion_version, better.candidate_value) == (v1, pytest.approx(0.95))
    assert "0.9500" in better.message and "0.9000" in better.message
    assert client.get_run(run3).data.tags["champion_decision"] == "promoted"

    v4, _ = register(0.95)
    equal = promote_if_better(uri, name, v4)
    assert not equal.promoted and _holder(client, name) == v3
    assert "strictly" in equal.message

    again = promote_if_better(uri, name, v3)
    assert not again.promoted and "already" in again.message


def test_candidate_without_the_metric_is_an_error(model):
    uri, name, client, register = model
    version, run_id = register(None)
    with pytest.raises(RegistryError, match=f"run {run_id}.*best_val_auc"):
        promote_if_better(uri, name, version)
    assert _holder(client, name) is None
    with pytest.raises(RegistryError, match="no version '99'"):
        promote_if_better(uri, name, "99")


def test_a_champion_without_the_metric_is_replaced(model):
    uri, name, client, register = model
    v1, _ = register(None)
    client.set_registered_model_alias(name, "champion", v1)  # set by hand, say
    v2, _ = register(0.7)
    decision = promote_if_better(uri, name, v2)
    assert decision.promoted and decision.champion_value is None
    assert _holder(client, name) == v2 and "no best_val_auc" in decision.message
