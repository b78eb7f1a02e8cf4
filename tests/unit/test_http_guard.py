"""The HTTP guard's rules (serving.server.request_rules), request by request, without a server:
one table, each row a request and what the guard answers itself (status and a fragment of its
message), or None where it forwards the request to Triton. The running guard in front of a real
tritonserver is in tests/integration/test_server_fuzz.py and test_server_security.py::

    python -m pytest tests/unit/test_http_guard.py -q
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from dataclasses import dataclass, field, replace

import pytest
from multidict import CIMultiDict

from serving.server.request_rules import Refusal, check_request, decode_body

LIMIT = 1 << 20  # --max-request-bytes of most rows
MODEL_PATH = "/v2/models/m"
INFER = f"{MODEL_PATH}/infer"
FILL = object()  # tensor(): data of the shape's element count
TOKEN = "s3cret-repository-token"
LOAD, UNLOAD = "/v2/repository/models/m/load", "/v2/repository/models/m/unload"
# Triton's datatypes: bytes per element (BYTES: its 4-byte length), and leaves JSON data may hold
SIZES = {
    **dict.fromkeys(["BOOL", "UINT8", "INT8"], 1),
    **dict.fromkeys(["UINT16", "INT16", "FP16", "BF16"], 2),
    **dict.fromkeys(["UINT32", "INT32", "FP32", "BYTES"], 4),
    **dict.fromkeys(["UINT64", "INT64", "FP64"], 8),
}
GOOD_LEAF = {"BOOL": True, "BYTES": "text", "FP16": 1.5, "BF16": 1.5, "FP32": 1.5, "FP64": 2}
BAD_LEAF = {"BOOL": (1, "int"), "BYTES": (1, "int"), "FP16": (True, "bool"), "BF16": ("1", "str")}
BAD_LEAF |= {"FP32": (True, "bool"), "FP64": (None, "NoneType")}
# the guard's 403 messages, word for word
CONTROL_OFF = (
    "model load/unload through the repository API is off; start the server with "
    "--model-control-mode explicit to allow it"
)
TOKEN_MISSING = (
    "model load/unload on this server needs the header medimg-repository-token: the token the "
    "server wrote to <repository>/.medimg-repository-token-<http port> (medimg publish --url "
    "reads it there, or from $MEDIMG_REPOSITORY_TOKEN)"
)


@dataclass(frozen=True)
class Request:
    """One request as the guard sees it. ``body``: a JSON value (encoded here) or bytes;
    ``binary``: bytes after the JSON, with Inference-Header-Content-Length set to the JSON's."""

    body: object = None
    path: str = INFER
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    binary: bytes | None = None
    encoding: str = "identity"
    max_bytes: int = LIMIT
    repository_control: bool = False
    token: str = ""
    raw_path: str | None = None

    def answer(self) -> tuple[int, str] | None:
        """What the guard answers itself, or None: the request goes to Triton."""
        raw = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        headers = CIMultiDict(self.headers)
        if self.binary is not None:
            headers.setdefault("Inference-Header-Content-Length", str(len(raw)))
            raw += self.binary
        try:
            body = decode_body(raw, self.encoding, self.max_bytes)
            check_request(
                self.method,
                self.path,
                headers,
                body,
                max_bytes=self.max_bytes,
                repository_control=self.repository_control,
                token=self.token,
                raw_path=self.raw_path,
            )
        except Refusal as refusal:
            return refusal.status, str(refusal)
        return None


def tensor(
    shape: object = (2,), datatype: object = "FP32", data: object = FILL, name: str = "x", **params
) -> dict:
    """An input; ``data`` by default the shape's count of a good leaf (None: no data)."""
    out = {"name": name, "shape": list(shape) if isinstance(shape, tuple) else shape}
    out["datatype"] = datatype
    if data is FILL and not params and isinstance(shape, tuple):
        data = [GOOD_LEAF.get(str(datatype), 1)] * math.prod(shape)
    if data is not FILL and data is not None:
        out["data"] = data
    return out | ({"parameters": params} if params else {})


def infer(*inputs: object, binary: bytes | None = None, **envelope: object) -> Request:
    """An infer request for model ``m`` with ``inputs`` (and ``binary`` bytes after them)."""
    return Request({"inputs": list(inputs), **envelope}, binary=binary)


def with_header_length(length: str) -> Request:
    """One BYTES image of 1 byte after the JSON, with this Inference-Header-Content-Length."""
    headers = {"Inference-Header-Content-Length": length}
    return replace(infer(tensor((1, 1), "BYTES", binary_data_size=1), binary=b"x"), headers=headers)


def params(**parameters: object) -> Request:
    return infer(tensor(), parameters=parameters)


def outputs(*outs: object) -> Request:
    return infer(tensor(), outputs=list(outs))


def shm(shape: tuple, datatype: str = "FP32", **parameters: object) -> Request:
    """An input in a shared-memory region (``r`` unless given) of ``shared_memory_byte_size``."""
    return infer(tensor(shape, datatype, **{"shared_memory_region": "r", **parameters}))


def repository(
    path: str, sent: str | None = None, *, repository_control: bool = True, token: str = TOKEN
) -> Request:
    """A POST to ``path`` carrying the repository token ``sent``, to a guard with
    ``repository_control`` (on unless given) and ``token``."""
    headers = {} if sent is None else {"Medimg-Repository-Token": sent}
    return Request(
        b"{}", path=path, headers=headers, repository_control=repository_control, token=token
    )


def row(name: str, request: Request, expected: str | None = None):
    """A row: ``expected`` is "STATUS fragment-of-the-message", None: forwarded to Triton."""
    return pytest.param(request, expected, id=name)


def rows_per_datatype() -> list:
    """Each datatype's element size (declared bytes against the limit) and JSON leaf types."""
    rows = []
    for kind, size in SIZES.items():
        fits, over = 12 // size, 12 // size + 1  # elements within / just above 12 bytes
        good = GOOD_LEAF.get(kind, 7)
        bad, bad_type = BAD_LEAF.get(kind, (1.5, "float"))
        rows += [
            row(
                f"{kind}-{fits}-within-12-bytes",
                replace(infer(tensor((fits,), kind)), max_bytes=12),
            ),
            row(
                f"{kind}-{over}-above-12-bytes",
                replace(infer(tensor((over,), kind)), max_bytes=12),
                f"400 declares {over * size} bytes, above the limit of 12 bytes",
            ),
            row(f"{kind}-leaf", infer(tensor((2,), kind, [good, good]))),
            row(
                f"{kind}-wrong-leaf",
                infer(tensor((2,), kind, [good, bad])),
                f"400 holds {json.dumps(bad)} ({bad_type}), {kind} needs",
            ),
        ]
    return rows


VALID = json.dumps({"inputs": [tensor()]}).encode()
ROWS = [
    # -- a valid request goes on to Triton; so do what Triton itself must judge
    row("valid", infer(tensor((1, 2)))),
    row("nested-data", infer(tensor((2, 2), data=[[1.0, 2.0], [3.0, 4.0]]))),
    row("empty-batch-is-tritons-to-refuse", infer(tensor((0, 1), "BYTES", data=[]))),
    row("fp-takes-int-and-float", infer(tensor((2,), data=[1, 2.5]))),
    row("no-inputs-is-tritons-to-refuse", infer()),
    row("get-not-checked", Request(b"garbage", method="GET")),
    row("other-path-not-checked", Request(b"garbage", path="/v2/models/m/ready")),
    # -- JSON
    row("truncated-json", Request(b'{"inputs": ['), "400 malformed JSON in the infer request"),
    row("nan", Request(b'{"inputs": [NaN]}'), "400 NaN is not valid JSON"),
    row("infinity", Request(b'{"inputs": [Infinity]}'), "400 Infinity is not valid JSON"),
    row("not-utf8", Request(b"\xff\xfe"), "400 malformed JSON"),
    row("too-deep", Request(b"[" * 5000 + b"]" * 5000), "400 malformed JSON"),
    # -- envelope: an object; inputs a list; id a string; outputs objects with a string name
    row(
        "not-an-object", Request([1, 2]), "400 the infer request must be a JSON object, got [1, 2]"
    ),
    row("inputs-missing", Request({}), "400 needs 'inputs', a list of tensors, got null"),
    row("inputs-not-a-list", Request({"inputs": {}}), "400 needs 'inputs', a list of tensors"),
    row("id-not-a-string", infer(tensor(), id=7), "400 'id' must be a string, got 7"),
    row("id-string", infer(tensor(), id="request-1")),
    row("outputs-not-a-list", infer(outputs={}), "400 'outputs' must be a list of objects"),
    row("output-not-an-object", outputs("y"), "400 outputs[0] must be an object with a string"),
    row("output-name-not-a-string", outputs({"name": 1}), "400 outputs[0] must be an object"),
    row("output-named", outputs({"name": "y"})),
    # -- parameters (of the request, an output, an input) of the JSON types Triton parses
    row("parameters-not-an-object", infer(parameters=[]), "400 the request: 'parameters' must"),
    row(
        "bool-parameter",
        params(binary_data_output=1),
        "400 the request: parameter 'binary_data_output' must be bool, got 1",
    ),
    row("sequence-start-string", params(sequence_start="true"), "400 'sequence_start' must be"),
    row("bool-parameters", params(sequence_end=True, binary_data=False)),
    row("negative-priority", params(priority=-1), "400 'priority' must be a non-negative integer"),
    row("float-timeout", params(timeout=1.5), "400 'timeout' must be a non-negative integer"),
    row("bool-is-no-integer", params(timeout=True), "400 'timeout' must be a non-negative"),
    row("integer-parameters", params(priority=0, timeout=100)),
    row("sequence-id-float", params(sequence_id=1.5), "400 'sequence_id' must be int/str"),
    row("sequence-id-string", params(sequence_id="a")),
    row("other-parameter-list", params(custom=[1]), "400 'custom' must be str/int/float/bool"),
    row("other-parameter-scalar", params(custom=2.5)),
    row(
        "output-parameter",
        outputs({"name": "y", "parameters": {"classification": -2}}),
        "400 output 'y': parameter 'classification' must be a non-negative integer",
    ),
    row("output-parameters", outputs({"name": "y", "parameters": 3}), "400 output 'y': 'param"),
    row(
        "input-parameter",
        infer(tensor((2,), binary_data_size="8")),
        "400 input 'x': parameter 'binary_data_size' must be a non-negative integer",
    ),
    # -- inputs: an object with a string name, a shape of non-negative integers, a datatype
    row("input-not-an-object", infer("x"), "400 inputs[0] must be an object with a string 'name'"),
    row("input-without-name", infer(tensor(), {"shape": [1]}), "400 inputs[1] must be an object"),
    row(
        "negative-dimension",
        infer(tensor([-1, 2], data=[1])),
        "400 input 'x': 'shape' must be a list of non-negative integers, got [-1, 2]",
    ),
    row("float-dimension", infer(tensor([1.5], data=[1])), "400 'shape' must be a list of non"),
    row("bool-dimension", infer(tensor([True], data=[1])), "400 'shape' must be a list of non"),
    row("shape-a-string", infer(tensor("1,1", data=[1])), "400 'shape' must be a list"),
    row("shape-missing", infer(tensor(None, data=[1])), "400 'shape' must be a list"),
    row(
        "unknown-datatype",
        infer(tensor((1,), "FP128", [1])),
        "400 input 'x': unknown datatype \"FP128\", expected one of ['BF16', 'BOOL', 'BYTES'",
    ),
    row("lower-case-datatype", infer(tensor((1,), "fp32", [1])), '400 unknown datatype "fp32"'),
    row("datatype-missing", infer(tensor((1,), None, [1])), "400 unknown datatype null"),
    # -- JSON data: a list of the shape's element count (the leaves: rows_per_datatype)
    row(
        "data-not-a-list",
        infer(tensor((2,), data="1,2")),
        "400 input 'x': 'data' must be a list (or use binary_data_size), got \"1,2\"",
    ),
    row("data-missing", infer(tensor((2,), data=None)), "400 'data' must be a"),
    row("too-few", infer(tensor((4,), data=[1, 2, 3])), "400 'data' holds 3 elements, the shape"),
    row("too-many", infer(tensor((2,), data=[1, 2, 3])), "400 'data' holds more than 3 elements"),
    row(
        "ragged", infer(tensor((2, 2), data=[[1, 2], [3]])), "400 holds 3 elements, the shape says"
    ),
    row("object-in-data", infer(tensor((2,), data=[1, {}])), "400 'data' holds {} (dict), FP32"),
    # -- declared sizes (prod(shape) x element size) against --max-request-bytes
    row(
        "huge-shape-that-aborts-triton",
        infer(tensor((1000000, 3, 64, 64), data=[0])),
        "400 model 'm': input 'x': shape [1000000, 3, 64, 64] of FP32 declares 49152000000 "
        "bytes, above the limit of 1048576 bytes (--max-request-bytes)",
    ),
    row(
        "beyond-int64",
        infer(tensor((2**40, 2**40), "BOOL", data=[1])),
        f"400 declares {2**80} bytes",
    ),
    row("bytes-4-each-at-limit", infer(tensor((LIMIT // 4,), "BYTES", binary_data_size=0))),
    row(
        "bytes-4-each-above-limit",
        infer(tensor((LIMIT // 4 + 1,), "BYTES", binary_data_size=0)),
        "400 of BYTES declares 1048580 bytes",
    ),
    row(
        "inputs-together-above-limit",
        infer(*(tensor((150000,), name=n, binary_data_size=600000) for n in "ab")),
        "400 input 'b': the inputs declare 1200000 bytes in all, above the limit of 1048576",
    ),
    # -- binary extension: binary_data_size, Inference-Header-Content-Length, the bytes after
    row("binary-fp32", infer(tensor((2,), binary_data_size=8), binary=bytes(8))),
    row(
        "binary-size-not-the-shapes",
        infer(tensor((2,), binary_data_size=7)),
        "400 input 'x': shape [2] of FP32 needs 8 bytes, binary_data_size is 7",
    ),
    row(
        "binary-data-missing",
        infer(tensor((1, 1), "BYTES", binary_data_size=5000), binary=bytes(100)),
        "400 the inputs declare 5000 bytes of binary data, the body holds 100 after the JSON",
    ),
    row("bytes-binary-any-size", infer(tensor((1, 1), "BYTES", binary_data_size=3), binary=b"abc")),
    row("header-length-beyond-body", with_header_length("99999"), "400 Inference-Header-Content"),
    row(
        "header-length-negative",
        with_header_length("-1"),
        "400 Inference-Header-Content-Length must be a non-negative integer, got '-1'",
    ),
    row("header-length-1e3", with_header_length("1e3"), "400 must be a non-negative integer"),
    row("header-length-cuts-the-json", with_header_length("3"), "400 malformed JSON"),
    # -- shared memory: the data is in a registered region, not the body
    row("shm-size-of-the-shape", shm((4,), shared_memory_byte_size=16)),
    row(
        "shm-size-not-the-shapes",
        shm((4,), shared_memory_byte_size=8),
        "400 input 'x': shape [4] of FP32 is 16 bytes, shared_memory_byte_size 8",
    ),
    row("shm-size-missing", shm((4,)), "400 shared_memory_byte_size None"),
    row("shm-bytes-any-size", shm((4,), "BYTES", shared_memory_byte_size=3)),
    row("shm-not-held-to-the-body-limit", shm((2**30,), shared_memory_byte_size=2**32)),
    row("shm-region-int", shm((4,), shared_memory_region=5), "400 'shared_memory_region' must"),
    row("shm-negative-offset", shm((4,), shared_memory_offset=-4), "400 'shared_memory_offset'"),
    # -- which paths are infer requests; the model named in the message
    row(
        "versioned-trailing-slash",
        Request(
            [], path=f"{MODEL_PATH}/versions/2/infer/", raw_path=f"{MODEL_PATH}/versions/2/%69nfer/"
        ),
        "400 model 'm': the infer request must be a JSON object",
    ),
    row(
        "percent-encoded", Request([], raw_path=f"{MODEL_PATH}/%69nfer"), "400 model 'm': the infer"
    ),
    row(
        "raw-path",
        Request([], path=f"{MODEL_PATH}/%2Finfer", raw_path=INFER),
        "400 the infer request",
    ),
    row("no-model-in-path", Request([], path="/v2/infer"), "400 the infer request must be a JSON"),
    # -- Content-Encoding: gzip and deflate inflated within the limit, no other
    row("gzip", Request(gzip.compress(VALID), encoding="gzip")),
    row("deflate", Request(zlib.compress(VALID), encoding=" Deflate ")),
    row("gzip-checked", Request(gzip.compress(b"[]"), encoding="GZIP"), "400 the infer request"),
    row(
        "brotli", Request(b"{}", encoding="br"), "415 Content-Encoding 'br': only gzip and deflate"
    ),
    row("corrupt-gzip", Request(b"not gzip", encoding="gzip"), "400 cannot decompress the gzip"),
    row("gzip-bomb", Request(gzip.compress(bytes(20 * LIMIT)), encoding="gzip"), "413 gzip-decom"),
    row(
        "gzip-at-limit",
        Request(gzip.compress(bytes(100)), "/v2", "GET", encoding="gzip", max_bytes=100),
    ),
    # -- repository load/unload: only with repository control on, and then with its token
    row("load-control-off", repository(LOAD, repository_control=False), "403 " + CONTROL_OFF),
    row("unload-control-off", repository(UNLOAD, TOKEN, repository_control=False), "403 is off"),
    row("control-on-no-token-configured", repository(LOAD, token="")),
    row("token-missing", repository(LOAD), "403 " + TOKEN_MISSING),
    row("token-wrong", repository(UNLOAD + "/", TOKEN[:-1]), "403 needs the header medimg-repo"),
    row("token-right", repository(UNLOAD, TOKEN)),
    row("index-stays-open", Request(b"{}", path="/v2/repository/index")),
    row("not-load-or-unload", Request(b"{}", path="/v2/repository/models/m/loaded")),
    *rows_per_datatype(),
]


@pytest.mark.parametrize(("request_", "expected"), ROWS)
def test_guard_rule(request_: Request, expected: str | None) -> None:
    got = request_.answer()
    if expected is None:
        assert got is None, got
    else:
        assert got is not None, f"forwarded, expected {expected}"
        status, fragment = expected.split(" ", 1)
        assert got[0] == int(status) and fragment in got[1], got
