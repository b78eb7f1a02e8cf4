"""Run the real ``tritonserver`` that ships inside the nvidia-pytriton wheel, on CPU.

:class:`TritonServer` runs the server tree from
:func:`~serving.server.home.prepare_server_home` as a child process in its own
session, with the environment from :func:`~serving.server.home.server_env` (so
Python-backend models import this environment's packages whether or not the venv
is activated), as its :class:`~serving.server.config.ServerConfig` says. Triton's HTTP listens
on a private port behind :mod:`serving.server.http_guard` on ``host:http_port``
(``http_guard=False``: none); a non-loopback ``host`` needs ``allow_public``::

    python -c "from serving.server.process import TritonServer, serve_foreground; \
raise SystemExit(serve_foreground(TritonServer('model_repository'), on_ready=lambda s: print(s.http_url)))"

"Failed to initialize NVML" / "CudaDriverHelper has not been initialized" are harmless on CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.repository.layout import CONFIG_FILE
from serving.server import http_guard
from serving.server import token as repository_token
from serving.server.cleanup import (
    core_lock_path,
    new_shm_prefix,
    remove_shm_regions,
    remove_stale_core_locks,
)
from serving.server.config import GUARD_ENV, ServerConfig
from serving.server.home import prepare_server_home, server_env
from serving.server.network import bind_problem, find_free_port
from training.errors import ServingError

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _terminate(process: subprocess.Popen | None, timeout: float, *, group: bool) -> None:
    """SIGTERM by PID, then SIGKILL (to its process group if ``group``) after ``timeout`` s."""
    if process is None or process.poll() is not None:
        return
    try:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        (os.killpg if group else os.kill)(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


class TritonServer:
    """A tritonserver child process as ``config`` says; use as a context manager.

    ``TritonServer(ServerConfig(repository, ...))``, or ``TritonServer(repository, **fields)``
    with :class:`~serving.server.config.ServerConfig`'s fields (ConfigError if one is wrong).
    """

    def __init__(self, config: ServerConfig | Path | str, **fields: Any) -> None:
        if isinstance(config, ServerConfig):
            if fields:
                raise TypeError(f"TritonServer(ServerConfig) takes no other options, got {fields}")
        else:
            config = ServerConfig(config, **fields)  # a str s3:// URL stays one
        self.config = config
        self.log_path: Path | None = None  # the server's stdout+stderr, once started
        self._own_log = False
        self._process: subprocess.Popen | None = None
        self._guard: subprocess.Popen | None = None  # serving.server.http_guard
        self._triton_http_port = config.http_port  # Triton's own HTTP: private behind the guard
        self.shm_prefix = new_shm_prefix()  # the Python backend's regions, private to this server
        self.leaked_shm: list[str] = []  # regions a killed server left, removed by stop()
        # the classifier instances' lock for borrowing idle cores (triton_backend/model.py):
        # private to this server, removed by stop()
        self.core_lock = core_lock_path(self.shm_prefix)
        # explicit mode: load/unload need this secret (serving.server.token)
        explicit = config.model_control_mode == "explicit"
        self.repository_token = repository_token.new_token() if explicit else ""
        self.token_file: Path | None = None  # where start() wrote it
        self._guard_token = secrets.token_urlsafe(32)  # the guard sends it to Triton's HTTP

    @property
    def repository(self) -> Path | str:
        """A local folder, or the ``s3://`` URL tritonserver reads (ServerConfig.remote)."""
        return self.config.repository

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def http_port(self) -> int:
        return self.config.http_port

    @property
    def grpc_port(self) -> int:
        return self.config.grpc_port

    @property
    def metrics_port(self) -> int:
        return self.config.metrics_port

    @property
    def http_guard(self) -> bool:
        return self.config.http_guard

    @property
    def max_request_bytes(self) -> int:
        return self.config.max_request_bytes

    @property
    def http_url(self) -> str:
        return self.config.http_url

    @property
    def grpc_url(self) -> str:
        """``host:port``, as ``tritonclient.grpc`` wants it (no scheme)."""
        return self.config.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.config.metrics_url

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def guard_pid(self) -> int | None:
        return self._guard.pid if self._guard else None

    def running(self) -> bool:
        """tritonserver, and the HTTP guard if there is one, are alive."""
        return self._process is not None and self.exited() is None

    def exited(self) -> tuple[str, int] | None:
        """(which, exit code) of tritonserver or else the HTTP guard if it has exited, or None."""
        for what, process in (("tritonserver", self._process), ("the HTTP guard", self._guard)):
            if process is not None and process.poll() is not None:
                return what, process.returncode
        return None

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def command(self, home: Path) -> list[str]:
        """The tritonserver command line, for a server ``home`` from prepare_server_home()."""
        return [
            str(home / "bin" / "tritonserver"),
            *self.config.to_args(
                home,
                shm_prefix=self.shm_prefix,
                triton_http_port=self._triton_http_port,
                guard_token=self._guard_token,
                repository_token=self.repository_token,
            ),
        ]

    def start(self) -> None:
        """Validate, then spawn tritonserver (returns at once; see :meth:`wait_ready`)."""
        if self.running():
            raise ServingError(f"tritonserver already running (pid {self.pid})")
        config, repo = self.config, self.config.repository
        if isinstance(repo, Path):  # a remote one (s3://) tritonserver checks itself
            if not repo.is_dir():
                missing = "is not a directory" if repo.exists() else "does not exist"
                raise ServingError(f"model repository {repo} {missing}")
            if not any((p / CONFIG_FILE).is_file() for p in repo.iterdir() if p.name[0] != "."):
                raise ServingError(
                    f"model repository {repo} holds no model (no <model>/{CONFIG_FILE})"
                )
        for name, port in config.ports.items():
            if problem := bind_problem(config.host, port):
                raise ServingError(f"{name} port {port} on {config.host}: {problem}")
        remove_stale_core_locks()
        home = prepare_server_home()
        self._triton_http_port = config.http_port
        while config.http_guard and self._triton_http_port in config.ports.values():
            self._triton_http_port = find_free_port()  # not one the caller has picked
        self._open_log()
        self._guard = None
        if self.repository_token:
            self._write_token()
        try:
            env = {**server_env(), "MEDIMG_CORE_LOCK": str(self.core_lock)}
            self._process = self._spawn(self.command(home), env=env, cwd=home)
            if config.http_guard:  # on host:http_port, in front of Triton's private HTTP port
                env = {
                    **os.environ,
                    repository_token.ENV: self.repository_token,
                    GUARD_ENV: self._guard_token,
                }
                guard = http_guard.command(config, self._triton_http_port)
                self._guard = self._spawn(guard, env=env)
        except OSError as exc:
            if self.running():
                self.stop()
            raise ServingError(f"cannot run tritonserver or its HTTP guard: {exc}") from exc

    def _open_log(self) -> None:
        """``log_path``: the configured log file, or a temporary one (removed by a clean stop)."""
        if self.config.log_file is not None:
            self.config.log_file.parent.mkdir(parents=True, exist_ok=True)
            self.log_path, self._own_log = self.config.log_file, False
        else:
            fd, name = tempfile.mkstemp(prefix="medimg-tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True

    def _write_token(self) -> None:
        path = repository_token.token_path(Path(self.config.repository), self.config.http_port)
        try:
            self.token_file = repository_token.write_token(path, self.repository_token)
        except OSError as exc:
            raise ServingError(
                f"explicit model control: cannot write the repository token to {path}: "
                f"{exc} (the repository must be writable by this user)"
            ) from exc

    def _spawn(
        self, command: list[str], env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.Popen:
        # Own session: Ctrl-C reaches us, stop() ends it; PDEATHSIG only from the main thread.
        die = _die_with_parent if threading.current_thread() is threading.main_thread() else None
        with open(self.log_path or os.devnull, "ab") as log:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die,
                env=env,
                cwd=cwd,
            )

    def wait_ready(
        self, timeout: float = 120, *, interrupted: threading.Event | None = None
    ) -> bool:
        """Poll ``/v2/health/ready`` until 200 (True) or ``interrupted`` is set (False);
        ServingError with the log tail if a process exits first, or (both stopped) after
        ``timeout`` s."""
        if self._process is None:
            raise ServingError("tritonserver was not started")
        deadline = time.monotonic() + timeout
        while True:
            if dead := self.exited():
                tail = self.log_tail()
                self.stop()  # the other one
                raise ServingError(
                    f"{dead[0]} exited with code {dead[1]} before it was ready "
                    f"(log {self.log_path}):\n{tail}"
                )
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no *_proxy
            try:
                with opener.open(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:  # URLError, refused, reset, timeout
                pass
            if interrupted is not None and interrupted.is_set():
                return False
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise ServingError(
                    f"tritonserver not ready after {timeout:.0f} s; stopped:\n{tail}"
                )
            time.sleep(0.2)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM the HTTP guard, then tritonserver (SIGKILL to its group after ``timeout`` s);
        then remove the shared-memory regions a killed or crashed server left behind."""
        process, guard = self._process, self._guard
        if process is None:
            raise ServingError("tritonserver was not started")
        _terminate(guard, 10, group=False)
        _terminate(process, timeout, group=True)  # SIGKILL to the server and its backend stubs
        if process.returncode != 0:  # e.g. killed while loading: its backend stubs may linger
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # our session; gone if none are left
        if self._own_log and self.log_path is not None and process.returncode == 0:
            self.log_path.unlink(missing_ok=True)
        self.leaked_shm = remove_shm_regions(self.shm_prefix)
        self.core_lock.unlink(missing_ok=True)
        if self.token_file is not None:
            self.token_file.unlink(missing_ok=True)
        return process.returncode

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            if self.running():
                self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self.stop()


def serve_foreground(
    server: TritonServer, *, on_ready: Callable[[TritonServer], None] | None = None
) -> int:
    """Run ``server`` until SIGINT/SIGTERM (returns 0) or until it dies (returns non-zero).

    Call from the main thread: it installs signal handlers, restored before returning.
    """
    if threading.current_thread() is not threading.main_thread():
        raise ServingError("serve_foreground must run in the main thread (it handles signals)")
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda _signum, _frame: stop.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        server.start()
        try:
            if server.wait_ready(interrupted=stop) and not stop.is_set() and on_ready is not None:
                on_ready(server)
            while not stop.wait(0.5):
                if dead := server.exited():
                    server.stop()
                    what, code = dead
                    print(
                        f"{what} exited on its own with code {code} "
                        f"(log {server.log_path}):\n{server.log_tail()}",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 128 - code if code < 0 else code or 1
        except BaseException:
            if server.running():
                server.stop()
            raise
        code = server.stop()
        if code != 0:  # e.g. 1 when idle client connections outlived --exit-timeout-secs
            print(f"tritonserver stopped with code {code}:\n{server.log_tail(8)}", file=sys.stderr)
        return 0
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
