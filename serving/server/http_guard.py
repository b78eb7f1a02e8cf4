"""A validating reverse proxy in front of tritonserver's HTTP endpoint.

One HTTP/JSON infer request declaring a huge input shape aborts tritonserver 2.51
(``std::bad_alloc``); malformed JSON is answered 500. So
:class:`~serving.server.process.TritonServer` binds Triton's HTTP to a private 127.0.0.1
port and runs this guard (a child process, stopped by PID; :func:`command`) on
``host:http_port`` of its :class:`~serving.server.config.ServerConfig`. Triton answers that
port only requests carrying the guard's per-server token
(:func:`~serving.server.config.restricted_flags`; the guard gets it in
``$MEDIMG_GUARD_TOKEN``). The guard forwards every request over keep-alive connections, and
answers itself, Triton-style (``{"error": "..."}``, naming the input and problem), those that
:mod:`serving.server.request_rules` refuses: bodies above ``--max-request-bytes`` (413),
malformed infer requests (400), repository load/unload without ``--model-control-mode
explicit`` and the repository token (403; :mod:`serving.server.token`, given to the guard in
``$MEDIMG_REPOSITORY_TOKEN``, which the guard adds to the other repository requests, such as
the index, so these stay open)::

    python -m serving.cli.guard --host 127.0.0.1 --port 8000 --upstream 127.0.0.1:18000
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sys

from aiohttp import web
from multidict import CIMultiDict

from serving.server import token as repository_token
from serving.server.config import GUARD_HEADER, ServerConfig
from serving.server.request_rules import Refusal, check_request, decode_body, too_large

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}
HOP_BY_HOP |= {"transfer-encoding", "content-length", "host", "expect"}  # aiohttp sets these
OFFLOAD_BYTES = 1 << 20  # bodies above this are checked in a worker thread


class Upstream:
    """Keep-alive HTTP/1.1 connections to tritonserver (Content-Length or chunked bodies)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.host, _, port = address.rpartition(":")
        self.port = int(port)

    async def _read(
        self, reader: asyncio.StreamReader, method: str
    ) -> tuple[int, list, bytes, bool]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        version, status = head[0].split(" ", 2)[:2]
        headers = [tuple(v.strip() for v in line.split(":", 1)) for line in head[1:] if ":" in line]
        fields = {k.lower(): v for k, v in headers}
        reuse = fields.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        if method == "HEAD" or status in ("204", "304"):
            return int(status), headers, b"", reuse
        if "content-length" in fields:
            payload = await reader.readexactly(int(fields["content-length"]))
            return int(status), headers, payload, reuse
        if "chunked" not in fields.get("transfer-encoding", ""):
            return int(status), headers, await reader.read(), False
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append((await reader.readexactly(size + 2))[:-2])
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        return int(status), headers, b"".join(chunks), reuse

    async def request(
        self, method: str, target: str, headers: list, body: bytes
    ) -> tuple[int, list, bytes]:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.address}"]
        lines += [f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers), "", ""]
        data = "\r\n".join(lines).encode("latin-1") + body
        while True:
            reused = bool(self.idle)
            if reused:
                reader, writer = self.idle.pop()
            else:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(data)
                status, response_headers, payload, reuse = await self._read(reader, method)
            except BaseException as exc:
                writer.close()
                closed = isinstance(exc, ConnectionError) or getattr(exc, "partial", None) == b""
                if reused and closed:
                    continue  # an idle connection tritonserver had closed: once more, afresh
                raise
            if reuse:
                self.idle.append((reader, writer))
            else:
                writer.close()
            return status, response_headers, payload

    def close(self) -> None:
        while self.idle:
            self.idle.pop()[1].close()


class Guard:
    """The aiohttp handlers; ``upstream`` is Triton's own HTTP address, ``host:port``."""

    def __init__(
        self,
        upstream: str,
        max_bytes: int,
        repository_control: bool,
        token: str = "",
        guard_token: str = "",
    ) -> None:
        self.upstream, self.max_bytes = Upstream(upstream), max_bytes
        self.repository_control, self.token = repository_control, token
        self.guard_token = guard_token

    async def _body(self, request: web.BaseRequest) -> bytes:
        if (request.content_length or 0) > self.max_bytes:  # before 100 Continue, if expected
            raise too_large(request.content_length or 0, self.max_bytes)
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = bytearray()
        while chunk := await request.content.readany():
            body += chunk
            if len(body) > self.max_bytes:
                raise too_large(len(body), self.max_bytes, "request body of more than")
        encoding = request.headers.get("Content-Encoding", "identity")
        return decode_body(bytes(body), encoding, self.max_bytes)

    async def _check(self, request: web.BaseRequest, body: bytes) -> None:
        check = functools.partial(
            check_request,
            request.method,
            request.path,
            request.headers,
            body,
            max_bytes=self.max_bytes,
            repository_control=self.repository_control,
            token=self.token,
            raw_path=request.raw_path.partition("?")[0],
        )
        if len(body) > OFFLOAD_BYTES:  # parse in a thread: the loop keeps answering
            await asyncio.to_thread(check)
        else:
            check()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            body = await self._body(request)
            await self._check(request, body)
        except Refusal as refusal:
            return web.json_response({"error": str(refusal)}, status=refusal.status)
        skip = HOP_BY_HOP | {"content-encoding", repository_token.HEADER, GUARD_HEADER}
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in skip]
        if self.token and request.path.startswith("/v2/repository"):  # load/unload checked above
            headers.append((repository_token.HEADER, self.token))
        if self.guard_token:
            headers.append((GUARD_HEADER, self.guard_token))
        try:
            status, got, payload = await self.upstream.request(
                request.method, request.raw_path, headers, body
            )
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            message = f"tritonserver at {self.upstream.address} did not answer: {exc!r}"
            return web.json_response({"error": message}, status=502)
        keep = CIMultiDict((k, v) for k, v in got if k.lower() not in HOP_BY_HOP)
        return web.Response(body=payload, status=status, headers=keep)


async def run_guard(host: str, port: int, upstream: str, guard: Guard) -> None:
    """Serve ``guard`` until SIGTERM/SIGINT; in-flight requests get up to 5 s to finish."""
    server = web.Server(guard.handle, access_log=None, auto_decompress=False)  # no router
    runner = web.ServerRunner(server, shutdown_timeout=5)
    await runner.setup()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        note = f"http://{host}:{port} -> http://{upstream}, max request {guard.max_bytes} bytes"
        print(f"medimg http guard: {note}", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        guard.upstream.close()


def command(config: ServerConfig, upstream_port: int) -> list[str]:
    """The command line that runs the guard for a server with ``config`` as a child process,
    in front of Triton's own HTTP on 127.0.0.1:``upstream_port``."""
    options = {
        "host": config.host,
        "port": config.http_port,
        "upstream": f"127.0.0.1:{upstream_port}",
        "max-request-bytes": config.max_request_bytes,
        "model-control-mode": config.model_control_mode,
    }
    return [sys.executable, "-m", "serving.cli.guard", *(f"--{k}={v}" for k, v in options.items())]
