"""``medimg serve``: the Triton server in the foreground.

medimg serve --repository model_repository --model-control-mode explicit
medimg serve --repository s3://models/medimg --s3-endpoint http://127.0.0.1:9000 --model-control-mode poll
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from serving.cli.options import add_server_options, server_from_args

if TYPE_CHECKING:
    from serving.server.process import TritonServer


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.server.process import serve_foreground

    server = server_from_args(args)

    def ready(server: TritonServer) -> None:
        guard = f" (guarded, max {server.max_request_bytes} bytes)" if server.http_guard else ""
        print(
            f"Triton ready: HTTP {server.http_url}{guard}  gRPC {server.grpc_url}  "
            f"metrics {server.metrics_url}",
            flush=True,
        )
        if server.config.remote:
            print(f"serving {server.repository}", flush=True)
        if server.token_file is not None:
            print(
                f"model load/unload need the repository token in {server.token_file} "
                "(medimg publish --url reads it there)",
                flush=True,
            )

    return serve_foreground(server, on_ready=ready)


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the Triton server in the foreground")
    add_server_options(p)
    p.add_argument(
        "--s3-endpoint",
        default="",
        help="an S3-compatible endpoint http(s)://HOST:PORT for an s3://BUCKET/PREFIX "
        "--repository (default $MEDIMG_S3_ENDPOINT, else $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL)",
    )
    p.set_defaults(func=cmd_serve)
