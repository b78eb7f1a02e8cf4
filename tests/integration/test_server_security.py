"""Where the server listens and what its repository API allows: loopback unless a public
address is asked for explicitly (``--host`` on the command line, ``allow_public=True``),
and model load/unload only in ``--model-control-mode explicit``, with the server's
repository token, while the index, metadata and configs stay readable. Checked against real
servers; no public address is bound::

    python -m pytest tests/integration/test_server_security.py -q
"""

from __future__ import annotations

import json
import socket
import stat
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving import cli
from serving.cli.options import server_from_args
from serving.server import token as repository_token
from serving.server.config import GUARD_HEADER
from serving.server.process import TritonServer
from tests.fixtures.triton import MODEL, free_ports, server_fixture
from training.errors import ConfigError

pytestmark = pytest.mark.timeout(300)


def interface_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (192.0.2.2 on the project's machines)."""
    return [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]


def request(
    url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


server = server_fixture()


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "example.org", "interface"])
def test_a_public_host_needs_allow_public(tmp_path, host):
    if host == "interface":
        host = (interface_addresses() or ["192.0.2.2"])[0]
    with pytest.raises(ConfigError, match="--host") as error:
        TritonServer(tmp_path, host=host)
    assert "network" in str(error.value)
    assert TritonServer(tmp_path, host=host, allow_public=True).host == host  # not started


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_hosts_need_nothing(tmp_path, host):
    assert TritonServer(tmp_path, host=host).host == host


@pytest.mark.parametrize("command", ["serve", "pipeline"])
def test_cli_allows_a_public_host_only_when_given_and_warns(tmp_path, capsys, command):
    parser = cli.build_parser()
    base = [command, "--repository", str(tmp_path)] + (["--dataset", "x"] * (command == "pipeline"))
    default = server_from_args(parser.parse_args(base))
    assert default.host == "127.0.0.1" and default.http_guard
    assert capsys.readouterr().err == ""
    public = server_from_args(parser.parse_args([*base, "--host", "0.0.0.0"]))
    assert public.host == "0.0.0.0"
    assert "reachable from the network" in capsys.readouterr().err
    bare = server_from_args(
        parser.parse_args([*base, "--no-http-guard", "--max-request-bytes", "4096"])
    )
    assert not bare.http_guard and bare.max_request_bytes == 4096
    home = Path("/nonexistent")
    assert "--http-address=127.0.0.1" in bare.command(home)
    assert f"--http-port={bare.http_port}" in bare.command(home)  # Triton's own HTTP, no guard


def test_every_port_listens_on_loopback_only(server):
    addresses = interface_addresses()
    if not addresses:
        pytest.skip("no non-loopback IPv4 interface to try")
    ports = [server.http_port, server.grpc_port, server.metrics_port]
    triton_http = {
        c.laddr.port
        for c in psutil.Process(server.pid).net_connections("tcp")
        if c.status == "LISTEN"
    } - set(ports)
    assert triton_http, "tritonserver's own HTTP port not found"
    for port in ports + sorted(triton_http):
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # answers on loopback
        for address in addresses:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, port), timeout=5).close()


def test_repository_control_is_off_by_default_but_reading_works(server):
    for action in ("load", "unload"):
        url = f"{server.http_url}/v2/repository/models/{MODEL}/{action}"
        status, body = request(url, "POST", b"{}")
        assert status == 403, (action, status, body)
        assert "--model-control-mode explicit" in json.loads(body)["error"]
    status, body = request(f"{server.http_url}/v2/repository/index", "POST", b"{}")
    assert status == 200 and {m["name"] for m in json.loads(body)} >= {MODEL, f"{MODEL}_onnx"}
    for path in (
        f"/v2/models/{MODEL}",
        f"/v2/models/{MODEL}/config",
        f"/v2/models/{MODEL}_onnx/config",
    ):
        status, body = request(server.http_url + path)
        assert status == 200, (path, body[:200])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="not allowed"):  # Triton refuses itself
            client.unload_model(f"{MODEL}_onnx")
        assert client.is_model_ready(f"{MODEL}_onnx") and client.is_model_ready(MODEL)
        assert {m.name for m in client.get_model_repository_index().models} >= {MODEL}
    finally:
        client.close()


def test_tritons_own_http_port_answers_only_the_guard(server):
    """Triton's private HTTP port (behind the guard) refuses requests without the guard's
    token, so a local process cannot go around the guard, e.g. with the huge-shape JSON
    request that aborts tritonserver; through the guard everything answers as before."""
    private = f"http://127.0.0.1:{server._triton_http_port}"
    pid = server.pid
    bomb = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1000000, 3, 64, 64], "datatype": "FP32", "data": [0]}
            ]
        }
    ).encode()
    for path, method, data in (
        ("/v2/health/ready", "GET", None),
        (f"/v2/models/{MODEL}/config", "GET", None),
        ("/v2/repository/index", "POST", b"{}"),
        (f"/v2/models/{MODEL}_onnx/infer", "POST", bomb),
    ):
        status, body = request(private + path, method, data)
        assert 400 <= status < 500, (path, status, body[:300])
        assert GUARD_HEADER in body.decode(), (path, body[:300])
        wrong = {GUARD_HEADER: "not-the-token"}
        assert 400 <= request(private + path, method, data, wrong)[0] < 500, path
    assert server.pid == pid and server.running()
    assert request(f"{server.http_url}/v2/health/ready")[0] == 200
    assert request(f"{server.http_url}/v2/models/{MODEL}/config")[0] == 200


def test_explicit_mode_loads_and_unloads_only_with_the_token(
    triton_cache_dir, tiny_classifier_repository
):
    """Load/unload need the server's repository token over HTTP (guard or Triton's private
    port: no bypass) and gRPC; a cross-site form POST cannot carry it; the index stays open
    through the guard; the token file is the owner's only and goes with the server."""
    onnx = f"{MODEL}_onnx"
    with TritonServer(
        tiny_classifier_repository, model_control_mode="explicit", **free_ports()
    ) as srv:
        assert srv.guard_pid is not None
        token = repository_token.find_token(tiny_classifier_repository, srv.http_url)
        assert token == srv.repository_token and len(token) >= 32
        assert stat.S_IMODE(srv.token_file.stat().st_mode) == 0o600
        unload = f"{srv.http_url}/v2/repository/models/{MODEL}/unload"
        private = f"http://127.0.0.1:{srv._triton_http_port}/v2/repository/models/{MODEL}/unload"
        for url, headers in (
            (unload, {}),  # what a web page's form POST can send
            (unload, {repository_token.HEADER: token[:-1] + "x"}),
            (private, {}),  # Triton's own port, behind the guard
        ):
            status, body = request(url, "POST", b"{}", headers)
            assert status in (400, 403), (url, headers, status, body)
            assert repository_token.HEADER in body.decode(), body
            assert request(f"{srv.http_url}/v2/models/{MODEL}/ready")[0] == 200  # still there
        status, body = request(f"{srv.http_url}/v2/repository/index", "POST", b"{}")
        assert status == 200 and {m["name"] for m in json.loads(body)} >= {MODEL, onnx}

        status, body = request(unload, "POST", b"{}", {repository_token.HEADER: token})
        assert status == 200, body
        assert request(f"{srv.http_url}/v2/models/{MODEL}/ready")[0] == 400
        load = f"{srv.http_url}/v2/repository/models/{MODEL}/load"
        status, body = request(load, "POST", b"{}", {repository_token.HEADER: token})
        assert status == 200, body
        assert request(f"{srv.http_url}/v2/models/{MODEL}/ready")[0] == 200
        assert request(f"{srv.http_url}/v2/models/{onnx}/ready")[0] == 200

        client = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            with pytest.raises(InferenceServerException, match=repository_token.HEADER):
                client.unload_model(MODEL)
            assert client.is_model_ready(MODEL)
            client.unload_model(MODEL, headers={repository_token.GRPC_HEADER: token})
            assert not client.is_model_ready(MODEL)
            client.load_model(MODEL, headers={repository_token.GRPC_HEADER: token})
            assert client.is_model_ready(MODEL)
        finally:
            client.close()
        token_file = srv.token_file
    assert not token_file.exists()
