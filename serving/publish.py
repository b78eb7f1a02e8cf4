"""``medimg publish``: an MLflow model (alias or version) into a Triton repository as its
next version, and onto a running server with no downtime.

1. Resolve ``NAME@ALIAS`` / ``NAME/VERSION`` / ``NAME`` in the MLflow registry (default:
   the ``champion`` of the only registered model).
2. Export it (ONNX, parity against PyTorch) as the next version of ``NAME_onnx`` and
   ``NAME_preprocess`` plus the ensemble ``NAME``, into a local directory or an
   ``s3://bucket/prefix`` repository (version files first, each ``config.pbtxt`` last;
   the version being served is never touched).
3. With ``--url``, ask a server started with ``--model-control-mode explicit`` to load
   the models through Triton's repository API, steps before the ensemble. Triton loads
   the new version beside the old one, routes new requests to it once it is ready and
   unloads the old one after its in-flight requests finish. Load requests carry the
   server's repository token (:mod:`serving.server.token`), read from the file the
   server wrote into a local repository or from ``$MEDIMG_REPOSITORY_TOKEN``::

    medimg serve --model-control-mode explicit &
    medimg publish --model pneumoniamnist-densenet121@champion --url 127.0.0.1:8000
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from serving.export.onnx import ExportReport, export_model
from serving.repository.layout import next_version
from serving.repository.model_config import RepositoryOptions, classifier_name, preprocess_name
from serving.server import token as repository_token
from training.errors import ConfigError, GateError, RegistryError, ServingError
from training.gate import Gate, check_version
from training.registry import load_model, resolve_model_uri

log = logging.getLogger(__name__)


@dataclass
class Published:
    what: str  # "NAME version V" in MLflow
    repository: str
    models: list[str]  # composing models first, the ensemble last
    version: int  # the Triton version written
    report: ExportReport
    serving: list[int] | None = None  # versions of NAME_onnx ready on the server, if asked


def default_model_ref(tracking_uri: str) -> str:
    """``NAME@champion`` of the only registered model."""
    from mlflow import MlflowClient

    names = sorted(
        m.name for m in MlflowClient(tracking_uri=tracking_uri).search_registered_models()
    )
    if len(names) != 1:
        raise RegistryError(
            f"MLflow at {tracking_uri}: pass --model NAME@ALIAS or NAME/VERSION; "
            f"registered models: {names or 'none'}"
        )
    return f"{names[0]}@champion"


def publish(
    model_ref: str,
    repository: str,
    *,
    tracking_uri: str,
    data_dir: str,
    options: RepositoryOptions | None = None,
    url: str = "",
    s3_endpoint: str | None = None,
    gate: Gate | None = None,
) -> Published:
    """Export ``model_ref`` as the next version into ``repository`` (a directory or
    ``s3://...``) and, with ``url``, load it on that server."""
    options = options or RepositoryOptions()
    if s3_endpoint and not repository.startswith("s3://"):
        raise ConfigError(
            f"--s3-endpoint {s3_endpoint} needs an s3://bucket/prefix repository, "
            f"got {repository!r}"
        )
    if url:  # before the export, which takes a while: is there a server to load into?
        check_server(url)
    client = None
    if repository.startswith("s3://"):  # before MLflow, whose artifacts may be on the same store
        from serving.repository import s3

        client = s3.s3_client(s3_endpoint)
        s3.check_bucket(client, repository)
    uri, what = resolve_model_uri(tracking_uri, model=model_ref or default_model_ref(tracking_uri))
    if gate is not None:  # before anything is written
        decision = check_version(gate, tracking_uri, uri)
        print(decision.message, flush=True)
        if not decision.passed:
            raise GateError(f"{what} did not pass the gate {gate.source}: not published")
    loaded = load_model(tracking_uri, uri)
    spec = loaded.spec
    names = [preprocess_name(spec), classifier_name(spec), spec.model_name]
    if client is not None:
        version = s3.next_remote_version(client, repository, names[:2])
        note = f"{what} from {socket.gethostname()} pid {os.getpid()} at {time.ctime()}"
        s3.claim_version(client, repository, names[1], version, note)  # before the export
        with tempfile.TemporaryDirectory(prefix="medimg-publish-") as tmp:
            report = export_model(
                loaded, Path(tmp), data_dir=data_dir, options=options, version=version
            )
            s3.upload_model_set(Path(tmp), names, version, repository, client)
    else:
        local = Path(repository)
        version = max(next_version(local / name) for name in names[:2])
        report = export_model(loaded, local, data_dir=data_dir, options=options, version=version)
    published = Published(what, repository, names, version, report)
    if url:
        token = repository_token.find_token(repository, url)
        published.serving = load_on_server(url, names, version, token=token)
    return published


def check_server(url: str, timeout_s: float = 10) -> None:
    """Raise :class:`ServingError` unless a Triton server answers at ``url`` (HTTP)."""
    import tritonclient.http as httpclient

    try:
        client = httpclient.InferenceServerClient(
            url.removeprefix("http://"), connection_timeout=timeout_s, network_timeout=timeout_s
        )
        try:
            live = client.is_server_live()
        finally:
            client.close()
    except Exception as exc:
        raise ServingError(
            f"cannot reach Triton at {url} (HTTP): {exc}; nothing was published"
        ) from exc
    if not live:
        raise ServingError(f"Triton at {url} is not live; nothing was published")


def load_on_server(
    url: str, names: list[str], version: int, timeout_s: float = 300, *, token: str | None = None
) -> list[int]:
    """Load ``names`` (in order) through the repository API of the server at ``url``
    (HTTP, ``HOST:PORT``), sending the repository ``token`` of a server in explicit mode
    (:mod:`serving.server.token`); returns the versions of the classifier now ready there."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    headers = {repository_token.HEADER: token} if token else None

    client = httpclient.InferenceServerClient(
        url.removeprefix("http://"), connection_timeout=timeout_s, network_timeout=timeout_s
    )
    try:
        for name in names:
            try:
                client.load_model(name, headers=headers)
            except InferenceServerException as exc:
                hint = ""
                if repository_token.HEADER in str(exc) and not token:
                    hint = (
                        f" (no repository token: run publish where the server's repository "
                        f"is, or set ${repository_token.ENV})"
                    )
                elif "explicit" in str(exc) or "not allowed" in str(exc):
                    hint = (
                        " (the server must run with --model-control-mode explicit; "
                        "a polling server picks the new version up by itself)"
                    )
                raise ServingError(
                    f"Triton at {url}: loading {name!r} version {version} failed: "
                    f"{exc.message() or exc}{hint}; the versions it served before still serve"
                ) from exc
        classifier = names[1]
        ready = serving_versions(client, classifier, headers)
        if version not in ready:
            raise ServingError(
                f"Triton at {url}: {classifier!r} loaded but version {version} is not ready "
                f"(ready: {ready}); check the model's version_policy"
            )
        return ready
    except OSError as exc:
        raise ServingError(f"cannot reach Triton at {url}: {exc}") from exc
    finally:
        client.close()


def serving_versions(client, model: str, headers: dict | None = None) -> list[int]:
    """Versions of ``model`` the server reports READY (repository index)."""
    index = client.get_model_repository_index(headers=headers)
    return sorted(
        int(entry["version"])
        for entry in index
        if entry.get("name") == model and entry.get("state") == "READY" and entry.get("version")
    )
