"""The HTTP guard as its own process: what ``medimg serve`` starts in front of
tritonserver's HTTP port (``serving.server.http_guard``), stopped by its PID::

    python -m serving.cli.guard --host 127.0.0.1 --port 8000 --upstream 127.0.0.1:18000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from serving.server import token as repository_token
from serving.server.config import DEFAULT_MAX_REQUEST_BYTES, GUARD_ENV
from serving.server.http_guard import Guard, run_guard


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("python -m serving.cli.guard", description=__doc__.split(".")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="tritonserver's own HTTP, HOST:PORT")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    p.add_argument("--model-control-mode", default="none", help="explicit: allow load/unload")
    args = p.parse_args(argv)
    try:
        explicit = args.model_control_mode == "explicit"
        token = os.environ.get(repository_token.ENV, "") if explicit else ""
        guard_token = os.environ.get(GUARD_ENV, "")
        guard = Guard(args.upstream, args.max_request_bytes, explicit, token, guard_token)
        asyncio.run(run_guard(args.host, args.port, args.upstream, guard))
    except OSError as exc:  # e.g. the port is taken
        print(f"medimg http guard: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
