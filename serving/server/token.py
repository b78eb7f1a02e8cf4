"""The secret that guards model load/unload on a server in explicit model-control mode.

Triton's repository API can load a model whose config and files come with the request,
and a Python-backend model runs the code it is given: whoever may load may run code as
the server. So with ``--model-control-mode explicit`` :class:`~serving.server.process.TritonServer`
makes a random token, has Triton refuse every repository request without it
(``--http-restricted-api`` / ``--grpc-restricted-protocol`` on ``model-repository``; the
HTTP guard adds it to index requests, which stay open, and checks it on load/unload), and
writes it, mode 0600, to ``<repository>/.medimg-repository-token-<http port>``, where
``medimg publish --url`` finds it (elsewhere: ``MEDIMG_REPOSITORY_TOKEN``)::

    medimg serve --model-control-mode explicit &
    medimg publish --url 127.0.0.1:8000          # reads model_repository/.medimg-repository-token-8000
    curl -X POST -H "medimg-repository-token: $(cat model_repository/.medimg-repository-token-8000)" \
        127.0.0.1:8000/v2/repository/models/NAME/load
    # gRPC: metadata triton-grpc-protocol-medimg-repository-token (GRPC_HEADER)

What it stops: a web page the user visits (a cross-origin request with a custom header
needs a CORS preflight that Triton does not grant) and network clients that cannot read
the file. What it does not: local users who can read Triton's command line in ``/proc``.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

HEADER = "medimg-repository-token"  # lower case: gRPC metadata keys must be
GRPC_HEADER = f"triton-grpc-protocol-{HEADER}"  # the metadata key Triton's gRPC checks
ENV = "MEDIMG_REPOSITORY_TOKEN"
FILE_PREFIX = ".medimg-repository-token-"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def matches(given: str | None, token: str) -> bool:
    """Whether ``given`` is ``token`` (constant time)."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def token_path(repository: Path, http_port: int) -> Path:
    """Where the server on ``http_port`` keeps its token: inside the repository it serves
    (whoever can write there can already change what it serves)."""
    return Path(repository) / f"{FILE_PREFIX}{http_port}"


def write_token(path: Path, token: str) -> Path:
    """``token`` into ``path``, readable by its owner only (mode 0600 from the start)."""
    path.unlink(missing_ok=True)  # a stale file of another user must not keep its mode
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return path


def find_token(repository: str | Path | None, url: str) -> str | None:
    """The token for the server at ``url`` (``HOST:PORT``): ``$MEDIMG_REPOSITORY_TOKEN``,
    else the file a server on that port wrote into the local ``repository``; None if neither."""
    if os.environ.get(ENV):
        return os.environ[ENV].strip()
    if not repository or "://" in str(repository):
        return None
    port = urlsplit(url if "://" in url else f"http://{url}").port
    path = token_path(Path(repository), port) if port else None
    if path is None or not path.is_file():
        return None
    return path.read_text().strip() or None
