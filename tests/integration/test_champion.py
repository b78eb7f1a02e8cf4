"""The champion alias against a real MLflow SQLite store (first version, worse, better, equal,
a champion without its metric or its run), and against a real tracking server behind a
loopback proxy that fails reads of the champion's run (the alias stays where it was)."""

from __future__ import annotations

import http.client
import itertools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

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


def test_a_champion_whose_run_is_gone_is_replaced(model):
    uri, name, client, register = model
    orphan = client.create_model_version(name, "file:///nowhere/model", run_id="0" * 32)
    client.set_registered_model_alias(name, "champion", orphan.version)
    v2, _ = register(0.6)
    decision = promote_if_better(uri, name, v2)
    assert decision.promoted and decision.champion_version == str(orphan.version)
    assert _holder(client, name) == v2 and "no best_val_auc" in decision.message


class _FlakyProxy(ThreadingHTTPServer):
    """A loopback HTTP proxy to a tracking server that answers 503 to ``runs/get`` for the
    run ids in ``failing`` and forwards everything else; ``refused`` counts those 503s."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = urlsplit(upstream).netloc
        self.failing: set[str] = set()
        self.refused = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    server: _FlakyProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        run_id = parse_qs(url.query).get("run_id", [""])[0]
        if url.path.endswith("/runs/get") and run_id in self.server.failing:
            self.server.refused += 1
            self._answer(
                503, b"upstream tracking store unavailable", {"Content-Type": "text/plain"}
            )
            return
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            kept = ("content-type",)
            headers = {k: v for k, v in response.getheaders() if k.lower() in kept}
            self._answer(response.status, response.read(), headers)
        finally:
            upstream.close()

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def flaky(mlflow_server, monkeypatch):
    """The real tracking server, and the proxy in front of it; the client retries a 503 once
    without waiting (MLflow's default backs off for minutes)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    proxy = _FlakyProxy(mlflow_server)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield mlflow_server, proxy
    proxy.shutdown()
    proxy.server_close()
    thread.join(timeout=10)


def test_a_failing_read_of_the_champion_stops_the_promotion(flaky):
    from mlflow import MlflowClient

    server, proxy = flaky
    healthy = MlflowClient(tracking_uri=server)
    experiment_id = healthy.create_experiment(f"champion-flaky-{next(_names)}")
    name = f"flaky-{next(_names)}"
    healthy.create_registered_model(name)

    def register(auc: float) -> tuple[str, str]:
        run_id = healthy.create_run(experiment_id).info.run_id
        healthy.log_metric(run_id, "best_val_auc", auc)
        healthy.set_terminated(run_id)
        version = healthy.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
        return str(version.version), run_id

    v1, run1 = register(0.95)
    assert promote_if_better(proxy.url, name, v1).promoted
    v2, run2 = register(0.80)  # worse: it may take the alias only if v1's number is missing

    proxy.failing.add(run1)
    with pytest.raises(RegistryError) as err:
        promote_if_better(proxy.url, name, v2)
    message = str(err.value)
    assert proxy.refused == 2  # the read and its one retry
    assert f"{name} version {v1}" in message and "best_val_auc" in message
    assert "503" in message and "nothing was changed" in message
    assert _holder(healthy, name) == v1
    assert "champion_decision" not in healthy.get_run(run2).data.tags

    proxy.failing.clear()
    kept = promote_if_better(proxy.url, name, v2)
    assert not kept.promoted and kept.champion_value == pytest.approx(0.95)
    assert _holder(healthy, name) == v1
