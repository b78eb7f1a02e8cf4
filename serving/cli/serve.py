"""``medimg serve``: the Triton server in the foreground.

medimg serve --repository model_repository --model-control-mode explicit
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from serving.cli.options import add_server_options, server_from_args

if TYPE_CHECKING:
    from serving.server.process import TritonServer


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.server.process import serve_foreground

    def ready(server: TritonServer) -> None:
        guard = f" (guarded, max {server.max_request_bytes} bytes)" if server.http_guard else ""
        print(
            f"Triton ready: HTTP {server.http_url}{guard}  gRPC {server.grpc_url}  "
            f"metrics {server.metrics_url}",
            flush=True,
        )
        if server.token_file is not None:
            print(
                f"model load/unload need the repository token in {server.token_file} "
                "(medimg publish --url reads it there)",
                flush=True,
            )

    return serve_foreground(server_from_args(args), on_ready=ready)


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the Triton server in the foreground")
    add_server_options(p)
    p.set_defaults(func=cmd_serve)
