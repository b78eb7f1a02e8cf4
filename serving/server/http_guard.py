"""A validating reverse proxy in front of tritonserver's HTTP endpoint.

One HTTP/JSON infer request declaring a huge input shape aborts tritonserver 2.51
(``std::bad_alloc``); malformed JSON is answered 500. So :class:`~serving.server.process.TritonServer`
binds Triton's HTTP to a private 127.0.0.1 port and runs this guard (a child process, stopped
by PID) on ``host:http_port``; Triton answers that port only requests carrying the
guard's per-server token (:func:`restricted_args`, given to the guard in
``$MEDIMG_GUARD_TOKEN``). It forwards every request over keep-alive connections and
answers these itself, Triton-style (``{"error": "..."}``, naming the input and problem):
bodies above ``--max-request-bytes`` (413; gzip/deflate bodies are inflated here within the
limit); infer requests with malformed JSON, shapes that are no list of non-negative integers,
unknown datatypes, declared sizes (prod(shape) x element size, BYTES 4) above the limit, JSON
data of another element count or type, missing binary data, or wrongly typed ids, parameters
or outputs (400); repository load/unload unless ``--model-control-mode explicit`` and the
request carries the repository token (403; :mod:`serving.server.token`, given to the
guard in ``$MEDIMG_REPOSITORY_TOKEN``, which the guard adds to the other repository
requests, such as the index, so these stay open)::

    python -m serving.cli.guard --host 127.0.0.1 --port 8000 --upstream 127.0.0.1:18000
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import sys
import zlib
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict

from serving.server import token as repository_token

if TYPE_CHECKING:
    from serving.server.process import TritonServer

DEFAULT_MAX_REQUEST_BYTES = 64 << 20
HEADER_LENGTH = "Inference-Header-Content-Length"
ELEMENT_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
                 "UINT32": 4, "INT32": 4, "FP32": 4, "BYTES": 4,  # BYTES: a 4-byte length each
                 "UINT64": 8, "INT64": 8, "FP64": 8}  # fmt: skip
_LEAVES = {"BOOL": (bool,), "BYTES": (str,), "FP": (int, float), "BF": (int, float)}
LEAF_TYPES = {kind: _LEAVES.get(kind, _LEAVES.get(kind[:2], (int,))) for kind in ELEMENT_BYTES}
_UINT, _BOOL = (int,), (bool,)
PARAMETER_TYPES = {"binary_data": _BOOL, "binary_data_output": _BOOL, "sequence_start": _BOOL,
                   "sequence_end": _BOOL, "classification": _UINT, "priority": _UINT,
                   "timeout": _UINT, "binary_data_size": _UINT, "shared_memory_byte_size": _UINT,
                   "shared_memory_offset": _UINT, "shared_memory_region": (str,),
                   "sequence_id": (int, str)}  # fmt: skip
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}
HOP_BY_HOP |= {"transfer-encoding", "content-length", "host", "expect"}  # aiohttp sets these
OFFLOAD_BYTES = 1 << 20  # infer headers above this are checked in a worker thread
# Triton's own HTTP port answers only requests that carry the guard's token, which the guard
# adds: a local process cannot go around the guard to that port (model-repository: see
# restricted_args).
GUARD_HEADER, GUARD_ENV = "medimg-guard-token", "MEDIMG_GUARD_TOKEN"
GUARDED_APIS = ("health", "metadata", "inference", "shared-memory", "model-config", "statistics",
                "trace", "logging")  # fmt: skip
TOKEN_MISSING = ("model load/unload on this server needs the header {header}: the token the "
                 "server wrote to <repository>/{prefix}<http port> (medimg publish --url "
                 "reads it there, or from ${env})")  # fmt: skip
REPOSITORY_CONTROL_OFF = ("model load/unload through the repository API is off; start the "
                          "server with --model-control-mode explicit to allow it")  # fmt: skip
_REPOSITORY_CONTROL = re.compile(r"/v2/repository/.*/(load|unload)/*")


def _short(value: object, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _check_data(label: str, data: object, datatype: str, expected: int) -> None:
    """JSON ``data`` (nested lists allowed) must hold ``expected`` elements of the type."""
    if not isinstance(data, list):
        raise ValueError(f"{label}: 'data' must be a list (or use binary_data_size), got {_short(data)}")  # fmt: skip
    allowed, count, stack = LEAF_TYPES[datatype], 0, [data]
    while stack and count <= expected:
        items = stack.pop()
        kinds = set(map(type, items))
        if list in kinds:
            stack.extend(x for x in items if type(x) is list)
            kinds.discard(list)
            count += sum(type(x) is not list for x in items)
        else:
            count += len(items)
        if kinds.difference(allowed):
            bad = next(x for x in items if type(x) is not list and type(x) not in allowed)
            want = "/".join(t.__name__ for t in allowed)
            raise ValueError(f"{label}: 'data' holds {_short(bad, 30)} ({type(bad).__name__}), {datatype} needs {want}")  # fmt: skip
    if count != expected:
        more = "more than " if count > expected else ""
        raise ValueError(f"{label}: 'data' holds {more}{count} elements, the shape says {expected}")


def _check_parameters(where: str, params: object) -> None:
    """Triton answers 500 to parameters of the wrong JSON type: name them here instead."""
    if not isinstance(params, dict):
        raise ValueError(f"{where}: 'parameters' must be a JSON object, got {_short(params)}")
    for key, value in params.items():
        kind = PARAMETER_TYPES.get(key, (str, int, float, bool))
        if type(value) not in kind or (kind == _UINT and value < 0):
            want = "a non-negative integer" if kind == _UINT else "/".join(k.__name__ for k in kind)
            raise ValueError(f"{where}: parameter {key!r} must be {want}, got {_short(value)}")


def _check_envelope(request: object) -> list:
    """What Triton parses besides the inputs' shapes and data; returns the inputs."""
    if not isinstance(request, dict):
        raise ValueError(f"the infer request must be a JSON object, got {_short(request)}")
    inputs, outputs = request.get("inputs"), request.get("outputs", [])
    if not isinstance(inputs, list):
        raise ValueError(f"the infer request needs 'inputs', a list of tensors, got {_short(inputs)}")  # fmt: skip
    if not isinstance(request.get("id", ""), str):
        raise ValueError(f"'id' must be a string, got {_short(request['id'])}")
    _check_parameters("the request", request.get("parameters", {}))
    if not isinstance(outputs, list):
        raise ValueError(f"'outputs' must be a list of objects, got {_short(outputs)}")
    for index, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise ValueError(f"outputs[{index}] must be an object with a string 'name', got {_short(out)}")  # fmt: skip
        _check_parameters(f"output {out['name']!r}", out.get("parameters", {}))
    return inputs


def _tensor_sizes(index: int, tensor: object, max_bytes: int) -> tuple[int, int]:
    """(bytes the body carries for ``inputs[index]``, of which binary); ValueError if bad."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise ValueError(f"inputs[{index}] must be an object with a string 'name', got {_short(tensor)}")  # fmt: skip
    label, shape, datatype = (
        f"input {tensor['name']!r}",
        tensor.get("shape"),
        tensor.get("datatype"),
    )
    if not isinstance(shape, list) or any(type(d) is not int or d < 0 for d in shape):
        raise ValueError(f"{label}: 'shape' must be a list of non-negative integers, got {_short(shape)}")  # fmt: skip
    if not isinstance(datatype, str) or datatype not in ELEMENT_BYTES:
        raise ValueError(f"{label}: unknown datatype {_short(datatype)}, expected one of {sorted(ELEMENT_BYTES)}")  # fmt: skip
    count = math.prod(shape)
    declared, params = count * ELEMENT_BYTES[datatype], tensor.get("parameters", {})
    what = f"{label}: shape {shape} of {datatype}"
    _check_parameters(label, params)
    if "shared_memory_region" in params:  # the data is in a registered region, not the body
        region = params.get("shared_memory_byte_size")
        if datatype != "BYTES" and region != declared:
            raise ValueError(f"{what} is {declared} bytes, shared_memory_byte_size {region}")
        return 0, 0
    if declared > max_bytes:
        raise ValueError(f"{what} declares {declared} bytes, above the limit of {max_bytes} bytes (--max-request-bytes)")  # fmt: skip
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if datatype != "BYTES" and size != declared:
            raise ValueError(f"{what} needs {declared} bytes, binary_data_size is {size}")
        return declared, size
    _check_data(label, tensor.get("data"), datatype, count)
    return declared, 0


def infer_problem(body: bytes, header_length: int | None, max_bytes: int) -> str | None:
    """What is wrong with one HTTP infer request body, or None (see the module docstring)."""
    header = body if header_length is None else body[:header_length]
    if header_length is not None and not 0 <= header_length <= len(body):
        return f"{HEADER_LENGTH} {header_length} is outside the body's {len(body)} bytes"
    try:
        request = json.loads(header, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return f"malformed JSON in the infer request: {exc}"
    total = binary = 0
    try:
        for index, tensor in enumerate(_check_envelope(request)):
            declared, in_binary = _tensor_sizes(index, tensor, max_bytes)
            total, binary = total + declared, binary + in_binary
            if total > max_bytes:
                raise ValueError(f"input {tensor['name']!r}: the inputs declare {total} bytes in all, above the limit of {max_bytes} bytes (--max-request-bytes)")  # fmt: skip
    except ValueError as exc:
        return str(exc)
    if binary > len(body) - len(header):
        return f"the inputs declare {binary} bytes of binary data, the body holds {len(body) - len(header)} after the JSON header"  # fmt: skip
    return None


class Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Upstream:
    """Keep-alive HTTP/1.1 connections to tritonserver (Content-Length or chunked bodies)."""

    def __init__(self, address: str) -> None:
        self.address, self.idle = address, []
        self.host, _, port = address.rpartition(":")
        self.port = int(port)

    async def _read(self, reader: asyncio.StreamReader, method: str) -> tuple[int, list, bytes, bool]:  # fmt: skip
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        version, status = head[0].split(" ", 2)[:2]
        headers = [tuple(v.strip() for v in line.split(":", 1)) for line in head[1:] if ":" in line]  # fmt: skip
        fields = {k.lower(): v for k, v in headers}
        reuse = fields.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        if method == "HEAD" or status in ("204", "304"):
            return int(status), headers, b"", reuse
        if "content-length" in fields:
            return int(status), headers, await reader.readexactly(int(fields["content-length"])), reuse  # fmt: skip
        if "chunked" not in fields.get("transfer-encoding", ""):
            return int(status), headers, await reader.read(), False
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append((await reader.readexactly(size + 2))[:-2])
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        return int(status), headers, b"".join(chunks), reuse

    async def request(self, method: str, target: str, headers: list, body: bytes) -> tuple[int, list, bytes]:  # fmt: skip
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.address}", f"Content-Length: {len(body)}"]  # fmt: skip
        data = "\r\n".join(lines + [f"{k}: {v}" for k, v in headers] + ["", ""]).encode("latin-1") + body  # fmt: skip
        while True:
            reused = bool(self.idle)
            reader, writer = self.idle.pop() if reused else await asyncio.open_connection(self.host, self.port)  # fmt: skip
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

    def _too_large(self, size: int, what: str = "request body") -> Refusal:
        limit = f"the limit of {self.max_bytes} bytes (--max-request-bytes)"
        return Refusal(413, f"{what} of {size} bytes is above {limit}")

    async def _body(self, request: web.BaseRequest) -> bytes:
        if (request.content_length or 0) > self.max_bytes:  # before 100 Continue, if expected
            raise self._too_large(request.content_length or 0)
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = bytearray()
        while chunk := await request.content.readany():
            body += chunk
            if len(body) > self.max_bytes:
                raise self._too_large(len(body), "request body of more than")
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding == "identity":
            return bytes(body)
        if encoding not in ("gzip", "deflate"):
            raise Refusal(415, f"Content-Encoding {encoding!r}: only gzip and deflate are accepted")
        inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib or gzip header
        try:
            plain = inflate.decompress(bytes(body), self.max_bytes + 1)
        except zlib.error as exc:
            raise Refusal(400, f"cannot decompress the {encoding} request body: {exc}") from None
        if len(plain) > self.max_bytes or inflate.unconsumed_tail:
            raise self._too_large(len(plain), f"{encoding}-decompressed body of more than")
        return plain

    async def _check(self, request: web.BaseRequest, body: bytes) -> None:
        path, raw = request.path.rstrip("/"), request.raw_path.partition("?")[0].rstrip("/")
        if request.method == "POST" and (path.endswith("/infer") or raw.endswith("/infer")):
            length = request.headers.get(HEADER_LENGTH)
            if length is not None and not length.strip().isdigit():
                raise Refusal(400, f"{HEADER_LENGTH} must be a non-negative integer, got {length!r}")  # fmt: skip
            header_length = None if length is None else int(length)
            args = (body, header_length, self.max_bytes)
            big = len(body) > OFFLOAD_BYTES  # parse in a thread: the loop keeps answering
            problem = await asyncio.to_thread(infer_problem, *args) if big else infer_problem(*args)
            if problem:
                model = re.search(r"/models/([^/]+)", path)
                raise Refusal(400, f"model {model[1]!r}: {problem}" if model else problem)
        elif _REPOSITORY_CONTROL.fullmatch(path):
            if not self.repository_control:
                raise Refusal(403, REPOSITORY_CONTROL_OFF)
            if self.token and not repository_token.matches(
                request.headers.get(repository_token.HEADER), self.token
            ):
                raise Refusal(403, TOKEN_MISSING.format(header=repository_token.HEADER,
                              prefix=repository_token.FILE_PREFIX, env=repository_token.ENV))  # fmt: skip

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
            status, got, payload = await self.upstream.request(request.method, request.raw_path, headers, body)  # fmt: skip
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


def restricted_args(guard_token: str, repository_token_: str) -> list[str]:
    """tritonserver flags that restrict its APIs: with a ``guard_token`` (a guard in front),
    every HTTP API needs it; with a ``repository_token_`` (explicit mode), model-repository
    (index, load, unload) needs that one instead, over HTTP and gRPC."""
    args = []
    if guard_token:
        apis = GUARDED_APIS if repository_token_ else (*GUARDED_APIS, "model-repository")
        args.append(f"--http-restricted-api={','.join(apis)}:{GUARD_HEADER}={guard_token}")
    if repository_token_:
        restricted = f"model-repository:{repository_token.HEADER}={repository_token_}"
        args += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
    return args


def command(server: TritonServer, upstream_port: int) -> list[str]:
    """The command line that runs the guard for ``server`` as a child process."""
    options = {"host": server.host, "port": server.http_port, "upstream": f"127.0.0.1:{upstream_port}",
               "max-request-bytes": server.max_request_bytes, "model-control-mode": server.model_control_mode}  # fmt: skip
    return [sys.executable, "-m", "serving.cli.guard", *(f"--{k}={v}" for k, v in options.items())]
