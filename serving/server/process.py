"""Run the real ``tritonserver`` that ships inside the nvidia-pytriton wheel, on CPU.

:class:`TritonServer` runs the server tree from
:func:`~serving.server.home.prepare_server_home` as a child process in its own
session, with the environment from :func:`~serving.server.home.server_env` (so
Python-backend models import this environment's packages whether or not the venv
is activated). Triton's HTTP listens on a private port behind :mod:`serving.server.http_guard` on
``host:http_port`` (``http_guard=False``: none); a non-loopback ``host`` needs ``allow_public``::

    python -c "from pathlib import Path; from serving.server.process import TritonServer, serve_foreground; \
raise SystemExit(serve_foreground(TritonServer(Path('model_repository')), on_ready=lambda s: print(s.http_url)))"

"Failed to initialize NVML" / "CudaDriverHelper has not been initialized" are harmless on CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from serving.repository.layout import CONFIG_FILE
from serving.server import http_guard
from serving.server import token as repository_token
from serving.server.home import prepare_server_home, server_env
from serving.server.http_guard import DEFAULT_MAX_REQUEST_BYTES
from training.errors import ConfigError, ServingError

MODEL_CONTROL_MODES = ("none", "poll", "explicit")
# On SIGTERM tritonserver waits up to --exit-timeout-secs (default 30) for in-flight requests
# *and idle keep-alive HTTP connections*, then exits with code 1. Keep it well under stop()'s
# timeout so the server ends by itself, not by SIGKILL. Override with extra_args.
EXIT_TIMEOUT_S = 5
SHM_ROOT = Path("/dev/shm")  # where POSIX shm_open() regions live on Linux
_PR_SET_PDEATHSIG = 1
_DETACHED = {"stdin": subprocess.DEVNULL, "stderr": subprocess.STDOUT, "start_new_session": True}


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def bind_problem(host: str, port: int) -> str | None:
    """Why a server could not bind ``host:port`` now, or None if it could (TIME_WAIT
    leftovers do not count)."""
    try:
        family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"cannot resolve the host name ({exc.strerror})"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "already in use"
            if exc.errno == errno.EADDRNOTAVAIL:
                return "not an address of this machine (--host takes a local one)"
            return f"cannot listen ({exc.strerror or exc})"
    return None


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not bind ``host:port`` now (TIME_WAIT leftovers do not count)."""
    return bind_problem(host, port) is not None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``; any other name or address counts as public."""
    with contextlib.suppress(ValueError):
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    return False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def remove_shm_regions(prefix: str, root: Path = SHM_ROOT) -> list[str]:
    """Remove the Python backend's shared-memory regions named ``prefix*`` that a stopped
    server left behind (a clean exit removes them; SIGKILL or a crash does not, and each
    holds 1 MiB or more of RAM until reboot). Only for a prefix unique to one stopped
    server: :class:`TritonServer` makes one per instance. Returns the names removed."""
    if not prefix or "/" in prefix:
        raise ConfigError(f"shared-memory prefix must be a plain file-name prefix, got {prefix!r}")
    return _unlink_where(root, lambda name: name.startswith(prefix))


def _unlink_where(root: Path, matches: Callable[[str], bool]) -> list[str]:
    """Remove the files in ``root`` whose name ``matches``; returns the names removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in root.iterdir():
            if matches(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry.name)
    return removed


CORE_LOCK_PREFIX = "medimg-cores-medimg"  # + launcher pid + "-" + hex: TritonServer.core_lock


def remove_stale_core_locks(root: Path = SHM_ROOT) -> list[str]:
    """Remove the core-lock files (triton_backend/model.py) of servers whose launching process
    is gone without calling stop() (it died, or ``os._exit``): empty files, but one per such
    server until reboot. A live launcher's locks stay. Returns the names removed."""

    def stale(name: str) -> bool:
        pid = name.removeprefix(CORE_LOCK_PREFIX).split("-")[0]
        return name.startswith(CORE_LOCK_PREFIX) and pid.isdigit() and not _alive(int(pid))

    return _unlink_where(root, stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
    """A tritonserver child process serving ``repository``; use as a context manager."""

    def __init__(
        self,
        repository: Path,
        *,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log_file: Path | None = None,
        model_control_mode: str = "none",
        extra_args: Sequence[str] = (),
        allow_public: bool = False,
        http_guard: bool = True,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        if model_control_mode not in MODEL_CONTROL_MODES:
            raise ConfigError(
                f"model_control_mode must be one of {MODEL_CONTROL_MODES}, got {model_control_mode!r}"
            )
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        for name, port in self.ports.items():
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise ConfigError(f"{name} port must be an integer in 1..65535, got {port!r}")
        if len(set(self.ports.values())) != 3:
            raise ConfigError(f"http, grpc and metrics ports must differ, got {self.ports}")
        if isinstance(extra_args, str):
            raise ConfigError("extra_args must be a sequence of arguments, not one string")
        if not is_loopback(host) and not allow_public:
            raise ConfigError(
                f"host {host!r} is not a loopback address: the endpoints would be reachable from "
                f"the network; give --host {host or '0.0.0.0'} explicitly (allow_public=True)"
            )
        self.repository, self.host = Path(repository), host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.model_control_mode, self.extra_args = model_control_mode, list(extra_args)
        self._url_host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        self._log_file = Path(log_file) if log_file is not None else None
        self.log_path: Path | None = None  # the server's stdout+stderr, once started
        self._own_log = False
        self.http_guard, self.max_request_bytes = http_guard, max_request_bytes
        self._process: subprocess.Popen | None = None
        self._guard: subprocess.Popen | None = None  # serving.server.http_guard
        self._triton_http_port = http_port  # Triton's own HTTP: private behind the guard
        # Private shared-memory regions: two servers on one machine must not share them.
        self.shm_prefix = f"medimg{os.getpid()}-{secrets.token_hex(4)}_"
        self.leaked_shm: list[str] = []  # regions a killed server left, removed by stop()
        # the classifier instances' lock for borrowing idle cores (triton_backend/model.py):
        # private to this server, removed by stop()
        name = self.shm_prefix.removeprefix("medimg").rstrip("_")  # <pid>-<hex>
        self.core_lock = SHM_ROOT / f"{CORE_LOCK_PREFIX}{name}"
        # explicit mode: load/unload need this secret (serving.server.token)
        explicit = model_control_mode == "explicit"
        self.repository_token = repository_token.new_token() if explicit else ""
        self.token_file: Path | None = None  # where start() wrote it
        self._guard_token = secrets.token_urlsafe(32)  # the guard sends it to Triton's HTTP

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def guard_pid(self) -> int | None:
        return self._guard.pid if self._guard else None

    @property
    def http_url(self) -> str:
        return f"http://{self._url_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port``, as ``tritonclient.grpc`` wants it (no scheme)."""
        return f"{self._url_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._url_host}:{self.metrics_port}/metrics"

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
        args = [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={home / 'backends'}",
            f"--cache-directory={home / 'caches'}",
            *(f"--{kind}-address={self.host}" for kind in ("grpc", "metrics")),
            f"--http-address={'127.0.0.1' if self.http_guard else self.host}",
            f"--http-port={self._triton_http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",  # no NVML/DCGM warnings on CPU
            "--pinned-memory-pool-byte-size=0",  # no CUDA: skip the failing pinned pool
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--model-control-mode={self.model_control_mode}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        guard_token = self._guard_token if self.http_guard else ""  # Triton answers the guard only
        args += http_guard.restricted_args(guard_token, self.repository_token)
        given = {a.split("=")[0] for a in self.extra_args}
        if self.model_control_mode == "explicit" and "--load-model" not in given:
            args.append("--load-model=*")
        if "--exit-timeout-secs" not in given:
            args.append(f"--exit-timeout-secs={EXIT_TIMEOUT_S}")
        return args + self.extra_args

    def start(self) -> None:
        """Validate, then spawn tritonserver (returns at once; see :meth:`wait_ready`)."""
        if self.running():
            raise ServingError(f"tritonserver already running (pid {self.pid})")
        repo = self.repository
        if not repo.is_dir():
            problem = "is not a directory" if repo.exists() else "does not exist"
            raise ServingError(f"model repository {repo} {problem}")
        if not any((p / CONFIG_FILE).is_file() for p in repo.iterdir() if p.name[0] != "."):
            raise ServingError(f"model repository {repo} holds no model (no <model>/{CONFIG_FILE})")
        for name, port in self.ports.items():
            if problem := bind_problem(self.host, port):
                raise ServingError(f"{name} port {port} on {self.host}: {problem}")
        remove_stale_core_locks()
        home = prepare_server_home()
        self._triton_http_port = self.http_port
        while self.http_guard and self._triton_http_port in self.ports.values():
            self._triton_http_port = find_free_port()  # not one the caller has picked
        if self._log_file is not None:
            self._log_file.parent.mkdir(parents=True, exist_ok=True)
            self.log_path, self._own_log = self._log_file, False
        else:
            fd, name = tempfile.mkstemp(prefix="medimg-tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self._guard = None
        if self.repository_token:
            path = repository_token.token_path(repo, self.http_port)
            try:
                self.token_file = repository_token.write_token(path, self.repository_token)
            except OSError as exc:
                raise ServingError(
                    f"explicit model control: cannot write the repository token to {path}: "
                    f"{exc} (the repository must be writable by this user)"
                ) from exc
        try:
            env = {**server_env(), "MEDIMG_CORE_LOCK": str(self.core_lock)}
            self._process = self._spawn(self.command(home), env=env, cwd=home)
            if self.http_guard:  # on host:http_port, in front of Triton's private HTTP port
                env = {
                    **os.environ,
                    repository_token.ENV: self.repository_token,
                    http_guard.GUARD_ENV: self._guard_token,
                }
                self._guard = self._spawn(http_guard.command(self, self._triton_http_port), env=env)
        except OSError as exc:
            if self.running():
                self.stop()
            raise ServingError(f"cannot run tritonserver or its HTTP guard: {exc}") from exc

    def _spawn(self, command: list[str], **popen: object) -> subprocess.Popen:
        # Own session: Ctrl-C reaches us, stop() ends it; PDEATHSIG only from the main thread.
        die = _die_with_parent if threading.current_thread() is threading.main_thread() else None
        with open(self.log_path or os.devnull, "ab") as log:
            return subprocess.Popen(command, stdout=log, preexec_fn=die, **_DETACHED, **popen)

    def wait_ready(
        self, timeout: float = 120, *, interrupted: threading.Event | None = None
    ) -> bool:
        """Poll ``/v2/health/ready`` until 200 (True) or ``interrupted`` is set (False); ServingError
        with the log tail if a process exits first, or (both stopped) after ``timeout`` s."""
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
