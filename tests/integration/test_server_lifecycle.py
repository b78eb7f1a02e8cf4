"""serving.server.process: tritonserver processes of their own — start failures, stop, the
prepared server home, dying with the parent, running without an activated venv, serve_foreground.

The tests on one shared, running server are in tests/integration/test_server.py::

    python -m pytest tests/integration/test_server_lifecycle.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from serving.server.cleanup import CORE_LOCK_PREFIX, remove_stale_core_locks
from serving.server.home import prepare_server_home
from serving.server.network import port_in_use
from serving.server.process import TritonServer
from tests.fixtures.triton import MODEL, children_of, free_ports, processes_where
from training.errors import ConfigError, ServingError

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no-config"])
def test_unusable_repository_fails_at_once(triton_cache_dir, tmp_path, case):
    repo = tmp_path / "repo"
    if case == "file":
        repo.write_text("not a directory")
    elif case == "empty":
        repo.mkdir()
    elif case == "no-config":
        (repo / "model" / "1").mkdir(parents=True)
    server = TritonServer(repo, **free_ports())
    started = time.monotonic()
    with pytest.raises(ServingError, match=str(repo)):
        server.start()
    assert time.monotonic() - started < 5
    assert server.pid is None and not server.running()


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("127.0.0.1", "already in use"),  # the port is bound below
        ("192.0.2.1", "not an address of this machine"),  # TEST-NET-1
        ("no-such-host.invalid", "cannot resolve the host name"),
    ],
)
def test_an_unusable_address_is_named_before_start(
    triton_cache_dir, tiny_classifier_repository, host, problem
):
    import socket

    ports = free_ports()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["http_port"]))
        taken.listen()
        server = TritonServer(tiny_classifier_repository, host=host, allow_public=True, **ports)
        with pytest.raises(
            ServingError, match=f"^http port {ports['http_port']} on {host}: {problem}"
        ):
            server.start()
    assert server.pid is None and not server.running()


def test_bad_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model_control_mode"):
        TritonServer(tmp_path, model_control_mode="sometimes")
    with pytest.raises(ConfigError, match="differ"):
        TritonServer(tmp_path, http_port=9000, grpc_port=9000, metrics_port=9002)
    with pytest.raises(ConfigError, match="http port"):
        TritonServer(tmp_path, http_port=0)


def test_model_that_fails_to_load_raises_with_log_tail(
    triton_cache_dir, tmp_path, tiny_classifier_repository
):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_classifier_repository, repo)
    (repo / f"{MODEL}_onnx" / "1" / "model.onnx").write_bytes(b"this is not an ONNX file")
    server = TritonServer(repo, log_file=tmp_path / "server.log", **free_ports())
    server.start()
    with pytest.raises(ServingError) as error:
        server.wait_ready(timeout=120)
    message = str(error.value)
    assert "exited with code 1 before it was ready" in message
    assert "INVALID_PROTOBUF" in message and "model.onnx" in message  # the log tail
    assert not server.running()


def test_stop_returns_zero_and_frees_the_ports(triton_cache_dir, tiny_classifier_repository):
    ports = free_ports()
    with TritonServer(tiny_classifier_repository, **ports) as server:
        pid = server.pid
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
        assert client.is_model_ready(MODEL)
        client.close()
        started = time.monotonic()
        code = server.stop()
    assert code == 0
    assert time.monotonic() - started < 15
    assert not server.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    for port in ports.values():
        assert not port_in_use("127.0.0.1", port)
    assert server.stop() == 0  # idempotent
    assert server.leaked_shm == []  # a clean exit removes its own regions


def test_killed_server_leaves_no_shared_memory(
    triton_cache_dir, tiny_classifier_repository, tmp_path
):
    """SIGKILL (a crash, the OOM killer) skips Triton's own cleanup of the Python backend's
    /dev/shm regions; stop() removes what this server left, and nothing of another's."""
    shm = Path("/dev/shm")
    bystander = shm / "medimg0-bystander_region"  # another server's: a different prefix
    bystander.write_bytes(b"x")
    log = tmp_path / "tritonserver.log"  # a crashed server's own log is kept: not in /tmp
    try:
        server = TritonServer(tiny_classifier_repository, log_file=log, **free_ports())
        with server:
            ours = sorted(p.name for p in shm.glob(server.shm_prefix + "*"))
            assert ours, f"no region named {server.shm_prefix}* while serving"
            os.killpg(server.pid, signal.SIGKILL)  # the server and its backend stubs
            server._process.wait(timeout=30)
            assert sorted(p.name for p in shm.glob(server.shm_prefix + "*")) == ours  # leaked
        assert sorted(server.leaked_shm) == ours
        assert not list(shm.glob(server.shm_prefix + "*"))
        assert bystander.exists()
    finally:
        bystander.unlink(missing_ok=True)


def test_prepare_server_home_concurrently(tmp_path):
    script = (
        "import sys; from serving.server.home import prepare_server_home; "
        "print(prepare_server_home(sys.argv[1]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    homes = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert [p.returncode for p in procs] == [0, 0, 0]
    (home,) = homes
    assert Path(home) == prepare_server_home(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [Path(home).name]  # no staging leftovers
    assert os.access(Path(home) / "backends" / "python" / "triton_python_backend_stub", os.X_OK)


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:  # gone already
        return ""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie waiting for a reaper has ended


def test_server_dies_with_the_process_that_started_it(
    triton_cache_dir, tiny_classifier_repository, tmp_path
):
    script = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        from serving.server.network import find_free_port
        from serving.server.process import TritonServer
        server = TritonServer(Path(sys.argv[1]), http_port=find_free_port(),
                              grpc_port=find_free_port(), metrics_port=find_free_port(),
                              log_file=Path(sys.argv[2]))
        server.start()
        server.wait_ready()
        print(server.core_lock, server.pid, server.guard_pid, flush=True)
        os._exit(0)  # no stop(), no atexit: only PR_SET_PDEATHSIG can end the server
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tiny_classifier_repository), str(tmp_path / "log")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lock, pid, guard_pid = done.stdout.split()[-3:]
    pid, guard_pid = int(pid), int(guard_pid)
    deadline = time.monotonic() + 30
    while not (_gone(pid) and _gone(guard_pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(pid), f"tritonserver {pid} outlived its parent"
    assert _gone(guard_pid), f"the HTTP guard {guard_pid} outlived its parent"
    # nobody called stop(): the next server's start() sweeps the core lock it left
    assert Path(lock).exists(), f"{lock}: the borrowing instances made no core lock"
    assert Path(lock).name in remove_stale_core_locks()
    assert not Path(lock).exists()


def test_stale_core_locks_go_and_live_ones_stay(tmp_path):
    getpid = [sys.executable, "-c", "import os; print(os.getpid())"]
    dead = subprocess.run(getpid, capture_output=True, text=True, check=True)
    stale = tmp_path / f"{CORE_LOCK_PREFIX}{dead.stdout.strip()}-0a1b2c3d"
    live = tmp_path / f"{CORE_LOCK_PREFIX}{os.getpid()}-0a1b2c3d"
    other = tmp_path / "medimg-cores-1234"  # the fallback name outside TritonServer: not ours
    for path in (stale, live, other):
        path.touch()
    assert remove_stale_core_locks(tmp_path) == [stale.name]
    assert live.exists() and other.exists() and not stale.exists()


def _stripped_env(cache: Path) -> dict[str, str]:
    """No venv on PATH, no VIRTUAL_ENV/PYTHONPATH/LD_LIBRARY_PATH: only the absolute interpreter."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "MEDIMG_CACHE_DIR": str(cache),
    }


def test_server_works_without_an_activated_venv(triton_cache_dir, tiny_classifier_repository):
    script = textwrap.dedent(
        """
        import io, json, sys
        import numpy as np
        from PIL import Image
        import tritonclient.http as httpclient
        from pathlib import Path
        from serving.server.network import find_free_port, port_in_use
        from serving.server.process import TritonServer

        ports = dict(http_port=find_free_port(), grpc_port=find_free_port(), metrics_port=find_free_port())
        with TritonServer(Path(sys.argv[1]), **ports) as server:
            client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
            inp = httpclient.InferInput("input", [2, 1, 32, 32], "FP32")
            inp.set_data_from_numpy(np.ones((2, 1, 32, 32), np.float32))
            out = client.infer("pneumoniamnist-densenet121_onnx", [inp]).as_numpy("probabilities")
            # the ensemble's preprocess step imports medimg's own code inside the stub
            png = Image.new("L", (32, 32), 255)
            buffer = io.BytesIO(); png.save(buffer, "PNG")
            image = httpclient.InferInput("image", [1, 1], "BYTES")
            image.set_data_from_numpy(np.array([[buffer.getvalue()]], dtype=np.object_))
            served = client.infer("pneumoniamnist-densenet121", [image]).as_numpy("probabilities")
            assert np.allclose(served, out[:1], atol=1e-5), (served, out)
            client.close()
            code = server.stop()
        print(json.dumps({"out": out.tolist(), "code": code,
                          "busy": [p for p in ports.values() if port_in_use("127.0.0.1", p)]}))
        """
    )
    python = ROOT / ".venv" / "bin" / "python"
    python = python if python.exists() else Path(sys.executable)
    done = subprocess.run(
        [str(python), "-c", script, str(tiny_classifier_repository)],
        cwd=ROOT,
        env=_stripped_env(triton_cache_dir),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["busy"] == []
    out = np.array(result["out"])
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


FOREGROUND = """
import sys
from pathlib import Path
from serving.server.network import find_free_port
from serving.server.process import TritonServer, serve_foreground

def ready(server):
    print("READY", server.pid, server.http_port, flush=True)

server = TritonServer(Path(sys.argv[1]), http_port=find_free_port(), grpc_port=find_free_port(),
                      metrics_port=find_free_port(), log_file=Path(sys.argv[2]))
sys.exit(serve_foreground(server, on_ready=ready))
"""


def _start_foreground(repository: Path, log: Path) -> tuple[subprocess.Popen, int, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", FOREGROUND, str(repository), str(log)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("READY"), (line, proc.stderr.read() if proc.poll() is not None else "")
    _, server_pid, http_port = line.split()
    return proc, int(server_pid), int(http_port)


def test_serve_foreground_exits_0_on_sigterm(
    triton_cache_dir, tiny_classifier_repository, tmp_path
):
    proc, server_pid, http_port = _start_foreground(tiny_classifier_repository, tmp_path / "log")
    idle = HTTPConnection("127.0.0.1", http_port, timeout=5)
    try:
        idle.request("GET", "/v2/health/ready")  # keep-alive: stays open while the server stops
        assert idle.getresponse().status == 200
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        assert time.monotonic() - started < 20  # --exit-timeout-secs, not stop()'s SIGKILL at 30 s
    finally:
        idle.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)  # the tritonserver child is gone too
    assert not port_in_use("127.0.0.1", http_port)


def test_serve_foreground_reports_a_dead_server(
    triton_cache_dir, tiny_classifier_repository, tmp_path
):
    proc, server_pid, _ = _start_foreground(tiny_classifier_repository, tmp_path / "log")
    try:
        os.kill(server_pid, signal.SIGKILL)  # the server dies on its own, as far as serve knows
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 128 + signal.SIGKILL
    assert "exited on its own" in stderr and "Started HTTPService" in stderr  # log tail


def test_serve_foreground_stopped_while_loading_leaves_no_stub(
    triton_cache_dir, tiny_classifier_repository, tmp_path
):
    proc = subprocess.Popen(
        [sys.executable, "-c", FOREGROUND, str(tiny_classifier_repository), str(tmp_path / "log")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, session = time.monotonic() + 60, []
        while len(session) < 2 and time.monotonic() < deadline:  # tritonserver + a stub
            children = children_of(proc.pid)  # tritonserver and the HTTP guard (a Python process)
            servers = [p for p in children if _exe(p).endswith("/tritonserver")]
            session = processes_where(2, servers[0]) if servers else []
            time.sleep(0.05)
        assert len(session) >= 2, "no backend stub started"
        proc.send_signal(signal.SIGTERM)  # usually while the model is still loading
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert processes_where(2, servers[0]) == []  # server and stubs all gone, at once
    assert all(_gone(pid) for pid in children)  # the guard too
