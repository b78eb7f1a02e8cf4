"""The HTTP guard's rules (:mod:`serving.server.http_guard`): which requests it answers
itself, and with what, as functions of the request alone (no server, no I/O).

Infer requests (:func:`infer_problem`, 400): the JSON envelope (an object; ``inputs`` a
list; ``id`` a string; ``outputs`` objects with a string ``name``), parameters of the
types Triton parses (:data:`PARAMETER_TYPES`), each input's name, shape (a list of
non-negative integers) and datatype (:data:`ELEMENT_BYTES`), its declared size
(prod(shape) x element size, BYTES 4 per element) and all inputs' together against the
limit, JSON data of the shape's element count and the datatype's leaf types
(:data:`LEAF_TYPES`), binary data (``binary_data_size`` equal to the declared size, and
present after the ``Inference-Header-Content-Length`` bytes of JSON), shared-memory
inputs (``shared_memory_byte_size`` equal to the declared size). Bodies
(:func:`decode_body`): gzip/deflate inflated within the limit (413), other encodings 415.
Repository load/unload (:func:`check_request`, 403): only with repository control on and
the server's repository token (:mod:`serving.server.token`)::

    python -c "from serving.server.request_rules import infer_problem; \
print(infer_problem(b'[]', None, 1 << 20))"
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Mapping

from serving.server import token as repository_token

HEADER_LENGTH = "Inference-Header-Content-Length"
ELEMENT_BYTES = {
    **dict.fromkeys(("BOOL", "UINT8", "INT8"), 1),
    **dict.fromkeys(("UINT16", "INT16", "FP16", "BF16"), 2),
    **dict.fromkeys(("UINT32", "INT32", "FP32", "BYTES"), 4),  # BYTES: a 4-byte length each
    **dict.fromkeys(("UINT64", "INT64", "FP64"), 8),
}
_LEAVES = {"BOOL": (bool,), "BYTES": (str,), "FP": (int, float), "BF": (int, float)}
LEAF_TYPES = {kind: _LEAVES.get(kind, _LEAVES.get(kind[:2], (int,))) for kind in ELEMENT_BYTES}
_UINT, _BOOL = (int,), (bool,)
PARAMETER_TYPES = {
    **dict.fromkeys(("binary_data", "binary_data_output", "sequence_start", "sequence_end"), _BOOL),
    **dict.fromkeys(("classification", "priority", "timeout", "binary_data_size"), _UINT),
    **dict.fromkeys(("shared_memory_byte_size", "shared_memory_offset"), _UINT),
    "shared_memory_region": (str,),
    "sequence_id": (int, str),
}
TOKEN_MISSING = (
    "model load/unload on this server needs the header {header}: the token the server wrote "
    "to <repository>/{prefix}<http port> (medimg publish --url reads it there, or from ${env})"
)
REPOSITORY_CONTROL_OFF = (
    "model load/unload through the repository API is off; start the server with "
    "--model-control-mode explicit to allow it"
)
_REPOSITORY_CONTROL = re.compile(r"/v2/repository/.*/(load|unload)/*")


class Refusal(Exception):
    """A request the guard answers itself: ``status`` and the message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _short(value: object, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _limit(max_bytes: int) -> str:
    return f"the limit of {max_bytes} bytes (--max-request-bytes)"


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _check_data(label: str, data: object, datatype: str, expected: int) -> None:
    """JSON ``data`` (nested lists allowed) must hold ``expected`` elements of the type."""
    if not isinstance(data, list):
        raise ValueError(
            f"{label}: 'data' must be a list (or use binary_data_size), got {_short(data)}"
        )
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
            raise ValueError(
                f"{label}: 'data' holds {_short(bad, 30)} ({type(bad).__name__}), "
                f"{datatype} needs {want}"
            )
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
        raise ValueError(
            f"the infer request needs 'inputs', a list of tensors, got {_short(inputs)}"
        )
    if not isinstance(request.get("id", ""), str):
        raise ValueError(f"'id' must be a string, got {_short(request['id'])}")
    _check_parameters("the request", request.get("parameters", {}))
    if not isinstance(outputs, list):
        raise ValueError(f"'outputs' must be a list of objects, got {_short(outputs)}")
    for index, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise ValueError(
                f"outputs[{index}] must be an object with a string 'name', got {_short(out)}"
            )
        _check_parameters(f"output {out['name']!r}", out.get("parameters", {}))
    return inputs


def _tensor_sizes(index: int, tensor: object, max_bytes: int) -> tuple[int, int]:
    """(bytes the body carries for ``inputs[index]``, of which binary); ValueError if bad."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise ValueError(
            f"inputs[{index}] must be an object with a string 'name', got {_short(tensor)}"
        )
    label, shape, datatype = (
        f"input {tensor['name']!r}",
        tensor.get("shape"),
        tensor.get("datatype"),
    )
    if not isinstance(shape, list) or any(type(d) is not int or d < 0 for d in shape):
        raise ValueError(
            f"{label}: 'shape' must be a list of non-negative integers, got {_short(shape)}"
        )
    if not isinstance(datatype, str) or datatype not in ELEMENT_BYTES:
        raise ValueError(
            f"{label}: unknown datatype {_short(datatype)}, expected one of {sorted(ELEMENT_BYTES)}"
        )
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
        raise ValueError(f"{what} declares {declared} bytes, above {_limit(max_bytes)}")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if datatype != "BYTES" and size != declared:
            raise ValueError(f"{what} needs {declared} bytes, binary_data_size is {size}")
        return declared, size
    _check_data(label, tensor.get("data"), datatype, count)
    return declared, 0


def infer_problem(body: bytes, header_length: int | None, max_bytes: int) -> str | None:
    """What is wrong with one HTTP infer request body, or None. ``header_length``: the
    ``Inference-Header-Content-Length`` (binary extension: the JSON header's bytes; the
    tensors' binary data follow it), None for a body that is JSON only."""
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
                raise ValueError(
                    f"input {tensor['name']!r}: the inputs declare {total} bytes in all, "
                    f"above {_limit(max_bytes)}"
                )
    except ValueError as exc:
        return str(exc)
    if binary > len(body) - len(header):
        return (
            f"the inputs declare {binary} bytes of binary data, "
            f"the body holds {len(body) - len(header)} after the JSON header"
        )
    return None


def too_large(size: int, max_bytes: int, what: str = "request body") -> Refusal:
    return Refusal(413, f"{what} of {size} bytes is above {_limit(max_bytes)}")


def decode_body(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """The body as sent, inflated for ``Content-Encoding`` gzip or deflate (refused above
    ``max_bytes`` inflated); 415 for another encoding."""
    encoding = encoding.strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise Refusal(415, f"Content-Encoding {encoding!r}: only gzip and deflate are accepted")
    inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib or gzip header
    try:
        plain = inflate.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise Refusal(400, f"cannot decompress the {encoding} request body: {exc}") from None
    if len(plain) > max_bytes or inflate.unconsumed_tail:
        raise too_large(len(plain), max_bytes, f"{encoding}-decompressed body of more than")
    return plain


def token_missing() -> str:
    """The 403 message for load/unload without the repository token."""
    return TOKEN_MISSING.format(
        header=repository_token.HEADER,
        prefix=repository_token.FILE_PREFIX,
        env=repository_token.ENV,
    )


def check_request(
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    max_bytes: int,
    repository_control: bool = False,
    token: str = "",
    raw_path: str | None = None,
) -> None:
    """Refusal (400) for an infer request that :func:`infer_problem` finds wrong, or with an
    ``Inference-Header-Content-Length`` that is no non-negative integer; Refusal (403) for a
    repository load/unload unless ``repository_control`` and (with a ``token``) the request
    carries it. ``body``: decoded (:func:`decode_body`); ``raw_path``: the path before
    percent-decoding, without the query (default ``path``); ``headers``: case-insensitive."""
    path = path.rstrip("/")
    raw = (path if raw_path is None else raw_path).rstrip("/")
    if method == "POST" and (path.endswith("/infer") or raw.endswith("/infer")):
        length = headers.get(HEADER_LENGTH)
        if length is not None and not length.strip().isdigit():
            raise Refusal(400, f"{HEADER_LENGTH} must be a non-negative integer, got {length!r}")
        header_length = None if length is None else int(length)
        if problem := infer_problem(body, header_length, max_bytes):
            model = re.search(r"/models/([^/]+)", path)
            raise Refusal(400, f"model {model[1]!r}: {problem}" if model else problem)
    elif _REPOSITORY_CONTROL.fullmatch(path):
        if not repository_control:
            raise Refusal(403, REPOSITORY_CONTROL_OFF)
        if token and not repository_token.matches(headers.get(repository_token.HEADER), token):
            raise Refusal(403, token_missing())
