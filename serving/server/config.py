"""What a tritonserver is started with: :class:`ServerConfig`, and its command-line flags.

In the manner of pytriton's ``TritonServerConfig``: the options as data, checked when made,
and :meth:`ServerConfig.to_args` writes tritonserver's ``--flag=value`` arguments (a list value:
the flag once per item). The HTTP guard (:mod:`serving.server.http_guard`) and the process
(:mod:`serving.server.process`) both take one; this module imports neither::

    python -c "from pathlib import Path; from serving.server.config import ServerConfig; \
print(ServerConfig(Path('model_repository'), model_control_mode='explicit').to_args(\
Path('/opt/tritonserver'), shm_prefix='medimg1-0a1b2c3d_'))"
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from serving.server import token as repository_token
from serving.server.network import is_loopback, url_host
from training.errors import ConfigError
from training.storage import storage_endpoint

MODEL_CONTROL_MODES = ("none", "poll", "explicit")
DEFAULT_MAX_REQUEST_BYTES = 64 << 20  # the HTTP guard's limit on one request body
# On SIGTERM tritonserver waits up to --exit-timeout-secs (default 30) for in-flight requests
# *and idle keep-alive HTTP connections*, then exits with code 1. Keep it well under stop()'s
# timeout so the server ends by itself, not by SIGKILL. Override with extra_args.
EXIT_TIMEOUT_S = 5
# Triton's own HTTP port answers only requests that carry the guard's token, which the guard
# adds: a local process cannot go around the guard to that port (model-repository: see
# restricted_args).
GUARD_HEADER, GUARD_ENV = "medimg-guard-token", "MEDIMG_GUARD_TOKEN"
GUARDED_APIS = (
    *("health", "metadata", "inference", "shared-memory"),
    *("model-config", "statistics", "trace", "logging"),
)


@dataclass(frozen=True)
class ServerConfig:
    """A tritonserver serving ``repository``, its endpoints on ``host`` (a non-loopback one
    needs ``allow_public``), its HTTP behind the guard unless ``http_guard`` is False.
    ``repository``: a local folder, or an ``s3://`` URL in Triton's own form (a ``str``,
    from :func:`triton_s3_url`), which tritonserver reads itself (modes none and poll).
    ``log_file``: the server's stdout and stderr (None: a temporary file, removed after a
    clean stop). ``extra_args`` go last on tritonserver's command line."""

    repository: Path | str
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control_mode: str = "none"
    extra_args: tuple[str, ...] = ()
    allow_public: bool = False
    http_guard: bool = True
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    log_file: Path | None = None

    def __post_init__(self) -> None:
        mode = self.model_control_mode
        if mode not in MODEL_CONTROL_MODES:
            raise ConfigError(
                f"model_control_mode must be one of {MODEL_CONTROL_MODES}, got {mode!r}"
            )
        for name, port in self.ports.items():
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise ConfigError(f"{name} port must be an integer in 1..65535, got {port!r}")
        if len(set(self.ports.values())) != 3:
            raise ConfigError(f"http, grpc and metrics ports must differ, got {self.ports}")
        if isinstance(self.extra_args, str):
            raise ConfigError("extra_args must be a sequence of arguments, not one string")
        if not is_loopback(self.host) and not self.allow_public:
            raise ConfigError(
                f"host {self.host!r} is not a loopback address: the endpoints would be reachable "
                f"from the network; give --host {self.host or '0.0.0.0'} explicitly "
                "(allow_public=True)"
            )
        if self.remote and mode == "explicit":
            raise ConfigError(
                f"explicit model control needs a local repository (the repository token is "
                f"written into it); serve {self.repository} with --model-control-mode none "
                "(read at start) or poll (which, in Triton 2.51, unloads every model while the "
                "store is unreachable)"
            )
        if not self.remote:
            object.__setattr__(self, "repository", Path(self.repository))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if self.log_file is not None:
            object.__setattr__(self, "log_file", Path(self.log_file))

    @property
    def remote(self) -> bool:
        """Whether tritonserver reads the repository itself from object storage (``s3://``)."""
        return isinstance(self.repository, str) and self.repository.startswith("s3://")

    @property
    def ports(self) -> dict[str, int]:
        return {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}

    @property
    def http_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port``, as ``tritonclient.grpc`` wants it (no scheme)."""
        return f"{url_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.metrics_port}/metrics"

    def to_args(
        self,
        home: Path,
        *,
        shm_prefix: str,
        triton_http_port: int | None = None,
        guard_token: str = "",
        repository_token: str = "",
    ) -> list[str]:
        """tritonserver's arguments for a server ``home`` from ``prepare_server_home()``; the
        rest is one start's: the Python backend's shared-memory prefix, Triton's own HTTP
        port (behind the guard; default ``http_port``), the token the guard sends to it and,
        in explicit mode, the token that load/unload need (:mod:`serving.server.token`)."""
        given = {arg.split("=")[0].removeprefix("--") for arg in self.extra_args}
        explicit = self.model_control_mode == "explicit"
        restricted = restricted_flags(guard_token if self.http_guard else "", repository_token)
        flags: dict[str, object] = {
            "model-repository": self.repository
            if isinstance(self.repository, str)
            else self.repository.resolve(),
            "backend-directory": home / "backends",
            "cache-directory": home / "caches",
            "grpc-address": self.host,
            "metrics-address": self.host,
            "http-address": "127.0.0.1" if self.http_guard else self.host,
            "http-port": triton_http_port or self.http_port,
            "grpc-port": self.grpc_port,
            "metrics-port": self.metrics_port,
            "allow-gpu-metrics": "false",  # no NVML/DCGM warnings on CPU
            "pinned-memory-pool-byte-size": 0,  # no CUDA: skip the failing pinned pool
            "exit-on-error": "true",
            "strict-readiness": "true",
            "model-control-mode": self.model_control_mode,
            "backend-config": f"python,shm-region-prefix-name={shm_prefix}",
            **restricted,
            "load-model": "*" if explicit and "load-model" not in given else None,
            "exit-timeout-secs": None if "exit-timeout-secs" in given else EXIT_TIMEOUT_S,
        }
        return [*render_flags(flags), *self.extra_args]


def triton_s3_url(url: str, endpoint: str = "") -> str:
    """An ``s3://BUCKET/PREFIX`` repository as tritonserver names it. On AWS it is unchanged;
    with an S3-compatible ``endpoint`` (``http(s)://HOST:PORT``; default ``$MEDIMG_S3_ENDPOINT``,
    ``$AWS_ENDPOINT_URL_S3``, ``$AWS_ENDPOINT_URL``, as ``medimg publish`` reads them) it is
    ``s3://http://HOST:PORT/BUCKET/PREFIX``. A URL already in Triton's form
    (``s3://[http(s)://]HOST:PORT/BUCKET/PREFIX``) is kept as given."""
    rest = url.removeprefix("s3://")
    first = rest.split("/", 1)[0]
    if rest.startswith(("http://", "https://")) or ":" in first:
        return url  # names its endpoint: Triton's form
    if not first:
        raise ConfigError(f"S3 repository {url!r} has no bucket (s3://BUCKET/PREFIX)")
    endpoint = storage_endpoint(endpoint)
    if not endpoint:
        return url
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.port or parts.path not in ("", "/"):
        raise ConfigError(
            f"S3 endpoint {endpoint!r}: tritonserver needs http(s)://HOST:PORT (with the port)"
        )
    return f"s3://{parts.scheme}://{parts.hostname}:{parts.port}/{rest.strip('/')}"


def render_flags(flags: Mapping[str, object]) -> list[str]:
    """``--key=value`` for each flag that is not None; a list or tuple: the flag once per item."""
    args = []
    for key, value in flags.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is not None:
                args.append(f"--{key}={item}")
    return args


def restricted_flags(guard_token: str, repository_token_: str) -> dict[str, list[str]]:
    """tritonserver flags that restrict its APIs: with a ``guard_token`` (a guard in front),
    every HTTP API needs it; with a ``repository_token_`` (explicit mode), model-repository
    (index, load, unload) needs that one instead, over HTTP and gRPC."""
    http, grpc = [], []
    if guard_token:
        apis = GUARDED_APIS if repository_token_ else (*GUARDED_APIS, "model-repository")
        http.append(f"{','.join(apis)}:{GUARD_HEADER}={guard_token}")
    if repository_token_:
        restricted = f"model-repository:{repository_token.HEADER}={repository_token_}"
        http.append(restricted)
        grpc.append(restricted)
    return {"http-restricted-api": http, "grpc-restricted-protocol": grpc}
