"""MLflow helpers: the experiment, the logged model with its spec, registered versions.

A model is logged as weights and spec, no code: ``weights.pt`` (a state dict, read back
with ``torch.load(weights_only=True)``) and ``spec.json`` under the ``medimg`` flavor of
its ``MLmodel``; :func:`load_model` rebuilds it with ``training.model``. Versions logged
before (``mlflow.pytorch``, pickled) still load, through MLflow's unpickling.

The default store is SQLite under ``./mlruns/`` (artifacts beside it); any
``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` (e.g. ``http://127.0.0.1:5000``) works::

    python -c "from training.registry import resolve_model_uri; print(resolve_model_uri('pneumoniamnist-densenet121'))"
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from training.errors import RegistryError
from training.model import ProbabilityHead, build_model, load_weights, save_weights
from training.spec import ModelSpec

log = logging.getLogger(__name__)
SPEC_KEY = "medimg_spec"
FLAVOR = "medimg"  # MLmodel flavor: state dict + spec, rebuilt by training.model
WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "spec.json"


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def sqlite_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts beside a local SQLite store (``<db dir>/artifacts``); None for servers."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    db = Path(tracking_uri[len("sqlite:///") :])
    return (db.parent / "artifacts").resolve().as_uri()


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The experiment's id, created (with an explicit artifact location) when missing."""
    import mlflow

    if urlparse(tracking_uri).scheme == "sqlite":
        Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    client = _client(tracking_uri)
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return client.create_experiment(name, artifact_location=sqlite_artifact_root(tracking_uri))
    except Exception as exc:
        raise RegistryError(
            f"MLflow at {tracking_uri}: cannot open experiment {name!r}: {exc}"
        ) from exc


class WeightsFlavor:
    """The ``medimg`` MLflow flavor, for ``mlflow.models.Model.log``: the weights of a
    :class:`~training.model.ProbabilityHead`'s network and the spec, no pickled code."""

    @staticmethod
    def save_model(
        path: str, mlflow_model: Any, *, model: nn.Module, spec: ModelSpec, signature: Any = None
    ) -> None:
        import torch

        if not isinstance(model, ProbabilityHead):
            raise RegistryError(
                f"log_and_register: expected a ProbabilityHead (the served model), got "
                f"{type(model).__name__}"
            )
        out = Path(path)
        out.mkdir(parents=True)
        save_weights(model.model, out / WEIGHTS_FILE, spec.to_json())
        (out / SPEC_FILE).write_text(spec.to_json())
        mlflow_model.signature = signature
        mlflow_model.add_flavor(
            FLAVOR,
            weights=WEIGHTS_FILE,
            spec=SPEC_FILE,
            format="torch.save state dict; load with torch.load(weights_only=True)",
            torch_version=str(torch.__version__),
        )
        mlflow_model.save(str(out / "MLmodel"))


def log_and_register(model: nn.Module, spec: ModelSpec, registered_name: str) -> tuple[str, str]:
    """Log ``model`` (a :class:`~training.model.ProbabilityHead`) to the active run as
    weights + spec (:class:`WeightsFlavor`) and register it.

    Returns (model URI, registered version).
    """
    import numpy as np
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    size = (-1, spec.channels, spec.image_size, spec.image_size)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), size, spec.input_name)]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, spec.num_classes), spec.output_name)]),
    )
    info = Model.log(
        artifact_path=None,  # deprecated, yet positional in MLflow 3
        name="model",
        flavor=WeightsFlavor,
        flavor_name=FLAVOR,
        registered_model_name=registered_name,
        metadata={SPEC_KEY: json.loads(spec.to_json())},
        model=model,
        spec=spec,
        signature=signature,
    )
    version = str(info.registered_model_version) if info.registered_model_version else ""
    return info.model_uri, version


def resolve_model_uri(tracking_uri: str, model: str = "", run_id: str = "") -> tuple[str, str]:
    """``NAME``, ``NAME/VERSION`` or ``NAME@alias``, or a run id -> (model URI, description).

    Without a version, the newest registered version is taken.
    """
    client = _client(tracking_uri)
    try:
        if run_id:
            client.get_run(run_id)
            return f"runs:/{run_id}/model", f"run {run_id}"
        if "@" in model:
            name, alias = model.split("@", 1)
            version = client.get_model_version_by_alias(name, alias).version
        elif "/" in model:
            name, version = model.rsplit("/", 1)
            client.get_model_version(name, version)
        else:
            name = model
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise RegistryError(f"MLflow at {tracking_uri}: no registered model named {name!r}")
            version = str(max(int(v.version) for v in versions))
    except RegistryError:
        raise
    except Exception as exc:
        what = f"run {run_id!r}" if run_id else f"model {model!r}"
        raise RegistryError(f"MLflow at {tracking_uri}: cannot find {what}: {exc}") from exc
    return f"models:/{name}/{version}", f"{name} version {version}"


@dataclass
class LoadedModel:
    module: nn.Module  # returns probabilities
    spec: ModelSpec
    uri: str


def load_model(tracking_uri: str, uri: str) -> LoadedModel:
    """Load a model logged by :func:`log_and_register`, with its spec: rebuilt from its
    weights, or (a version logged before, with ``mlflow.pytorch``) unpickled. Its artifacts
    are downloaded once, to a temporary directory removed afterwards (MLflow's own
    ``load_model`` and ``get_model_info`` each leave a copy in the temp dir)."""
    import mlflow
    from mlflow.models import Model

    mlflow.set_tracking_uri(tracking_uri)
    try:
        with tempfile.TemporaryDirectory(prefix="medimg-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            info = Model.load(local)
            meta = (info.metadata or {}).get(SPEC_KEY)
            if meta is None:
                raise RegistryError(
                    f"{uri}: not a medimg model (no {SPEC_KEY!r} in its MLflow metadata)"
                )
            spec = ModelSpec.from_dict(meta)
            module = _load_module(Path(local), info.flavors, spec, uri)
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"MLflow at {tracking_uri}: cannot load {uri}: {exc}") from exc
    module.eval()
    return LoadedModel(module=module, spec=spec, uri=uri)


def _load_module(local: Path, flavors: dict, spec: ModelSpec, uri: str) -> nn.Module:
    if FLAVOR in flavors:
        state, _ = load_weights(local / flavors[FLAVOR].get("weights", WEIGHTS_FILE))
        network = build_model(spec.channels, spec.num_classes)
        network.load_state_dict(state)
        return ProbabilityHead(network, spec.multi_label, spec.temperature)
    if "pytorch" in flavors:  # logged before the weights format: a pickled module
        import mlflow.pytorch

        log.info("%s: logged with pickle (mlflow.pytorch); loading runs its code", uri)
        return mlflow.pytorch.load_model(str(local), map_location="cpu")
    raise RegistryError(
        f"{uri}: no {FLAVOR!r} or 'pytorch' flavor in its MLmodel (has {sorted(flavors)})"
    )
