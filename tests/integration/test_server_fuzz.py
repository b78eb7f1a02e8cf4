"""Bounded fuzz test against one real server (tritonserver behind serving/server/http_guard.py):
a few thousand malformed requests from a seeded RNG -- random bytes and truncated PNG/DICOM
as images, wrong shapes, dtypes and names, empty batches, malformed JSON, huge declared
shapes (the request that aborts an unguarded tritonserver 2.51), bodies and images above
the configured byte limits -- over raw HTTP and gRPC. Every one must be answered 4xx (gRPC:
a client-error code) with a message naming the problem; afterwards the same processes
still run and answer a good request with the probabilities ONNX Runtime gives here::

    python -m pytest tests/integration/test_server_fuzz.py -q -s
"""

from __future__ import annotations

import gzip
import http.client
import json
import random
import struct
import time
import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.repository.layout import write_model_set
from serving.repository.model_config import RepositoryOptions
from tests.fixtures.requests import encoded, in_process, infer_bytes
from tests.fixtures.triton import MODEL, server_fixture
from training.images import read_image_bytes

pytestmark = pytest.mark.timeout(240)
SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "samples"
MAX_REQUEST, MAX_IMAGE = 1 << 20, 200_000  # the guard's and NAME_preprocess's byte limits
ONNX, INFER = f"{MODEL}_onnx", "/v2/models/{}/infer"
GRPC_CLIENT_ERRORS = {"INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION"}
DATATYPES = ["BOOL", "UINT8", "INT8", "INT16", "UINT32", "INT32", "INT64", "FP16", "FP64", "BYTES"]


@pytest.fixture(scope="module")
def fuzz_repository(tmp_path_factory, tiny_classifier_spec, tiny_classifier_onnx) -> Path:
    repo = tmp_path_factory.mktemp("fuzz_repository")
    options = RepositoryOptions(max_image_bytes=MAX_IMAGE)
    write_model_set(repo, tiny_classifier_spec, tiny_classifier_onnx, options)
    return repo


server = server_fixture("fuzz_repository", max_request_bytes=MAX_REQUEST)


def tensor(name: str, shape: list, datatype: str, data: object = None, **params) -> dict:
    out = {"name": name, "shape": shape, "datatype": datatype}
    if data is not None:
        out["data"] = data
    return out | ({"parameters": params} if params else {})


def body(*inputs: dict) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def binary_images(items: list[bytes]) -> tuple[bytes, dict]:
    """The ensemble's BYTES input in Triton's binary extension (header + length-prefixed)."""
    raw = b"".join(struct.pack("<I", len(item)) + item for item in items)
    header = body(tensor("image", [len(items), 1], "BYTES", binary_data_size=len(raw)))
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def undecodable_truncations(rng: random.Random, data: bytes, n: int) -> list[bytes]:
    """Truncations of ``data`` that the training decoder itself refuses."""
    found = []
    for _ in range(n * 3):
        cut = data[: rng.randrange(1, len(data))]
        try:
            with warnings.catch_warnings():  # pydicom warns about the cut files, then fails
                warnings.simplefilter("ignore")
                read_image_bytes(cut)
        except Exception:
            found.append(cut)
        if len(found) == n:
            break
    return found


def random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 2 else 7)
    if kind == 7:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 8:
        return {"name": random_json(rng, depth + 1)}
    leaves = (None, True, -rng.randrange(1 << 40), rng.random() * 1e6, "x" * rng.randrange(5))
    return (*leaves, 2**70, "FP32")[kind]


def http_cases(rng: random.Random, images: dict[str, bytes]):
    """(model, body, headers, words the error must name) for every malformed HTTP request."""
    png = images["png"]
    for _ in range(250):  # random bytes as images, as binary and as JSON strings
        junk = rng.randbytes(rng.randrange(1, 3000))
        yield MODEL, *binary_images([junk] if rng.random() < 0.7 else [png, junk]), ["image["]
        text = "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(1, 200)))
        yield MODEL, body(tensor("image", [1, 1], "BYTES", [text])), {}, ["image[0]"]
    for data in images.values():  # truncated PNG / DICOM the decoder cannot read
        for cut in undecodable_truncations(rng, data, 60):
            yield MODEL, *binary_images([cut]), ["image[0]"]
    yield MODEL, *binary_images([b""]), ["empty"]
    for _ in range(150):  # wrong shapes (the right element count), and batches above 32
        shape = [rng.choice([0, 1, 2, 3, 16, 32, 33]) for _ in range(rng.randrange(1, 6))]
        if len(shape) == 4 and shape[1:] == [1, 32, 32] and 1 <= shape[0] <= 32:
            continue
        count = int(np.prod(shape))
        if count <= 40_000:
            word = "batch" if shape[0] > 32 else "input"
            yield ONNX, body(tensor("input", shape, "FP32", [0.5] * count)), {}, [word]
    for datatype in DATATYPES * 12:  # wrong dtypes for the classifier and the ensemble
        value = {"BOOL": True, "BYTES": "a"}.get(datatype, 1)
        word = datatype
        yield ONNX, body(tensor("input", [1, 1, 32, 32], datatype, [value] * 1024)), {}, [word]
        if datatype != "BYTES":
            yield MODEL, body(tensor("image", [1, 1], datatype, [value])), {}, [word]
    for _ in range(30):  # empty batches, missing and unknown inputs
        yield MODEL, body(tensor("image", [0, 1], "BYTES", [])), {}, ["image"]
        yield ONNX, body(tensor("input", [0, 1, 32, 32], "FP32", [])), {}, ["input"]
        yield MODEL, body(), {}, ["input"]
        yield MODEL, b"{}", {}, ["inputs"]
        yield MODEL, body(tensor("nope", [1, 1], "BYTES", ["x"])), {}, ["nope"]
    for _ in range(60):  # unknown model names and versions
        name = "".join(rng.choice("abcxyz-_0123") for _ in range(rng.randrange(1, 20)))
        yield name, body(tensor("image", [1, 1], "BYTES", ["x"])), {}, [name]
        yield f"{MODEL}/versions/{rng.randrange(2, 99)}", *binary_images([png]), ["version"]
    good = body(tensor("input", [1, 1, 32, 32], "FP32", [0.0] * 1024))
    numbers = good.index(b'"data": [') + 9  # from here on only numbers, commas and brackets
    for _ in range(200):  # malformed JSON: truncated, corrupted, non-standard, not an object
        yield ONNX, good[: rng.randrange(len(good) - 1)], {}, ["json"]
        at = rng.randrange(numbers, len(good))
        corrupt = good[:at] + rng.choice([b"{", b"]", b'"', b"\xff", b",,"]) + good[at:]
        yield ONNX, corrupt, {}, ["json"]
    not_objects = [(b"NaN", "json"), (b"[1, 2]", "object"), (b'"inputs"', "object")]
    not_objects += [(b"[" * 5000 + b"]" * 5000, "json"), (b"\xff\xfe", "json")]
    for text, word in not_objects:
        yield ONNX, text, {}, [word]
    yield ONNX, body(tensor("input", [1], "FP32", [float("nan")])), {}, ["json"]
    for _ in range(150):  # huge declared shapes (the crash), JSON and binary, every dtype
        shape = [rng.choice([10**7, 2**31, 2**40]), *rng.choices([3, 64, 10**6, 2**31], k=2)]
        datatype = rng.choice([*DATATYPES, "FP32"])
        target = rng.choice([(ONNX, "input"), (MODEL, "image")])
        yield target[0], body(tensor(target[1], shape, datatype, [1, 2])), {}, ["above the limit"]
        head = body(tensor(target[1], shape, datatype, binary_data_size=8))
        yield (
            target[0],
            head + bytes(8),
            {"Inference-Header-Content-Length": str(len(head))},
            ["above the limit"],
        )
    for bad in ([-1, 1, 32, 32], [1.5, 1], ["1", 1], [None], [[1]], [True, 1], "1,1", {}, 7):
        yield ONNX, body(tensor("input", bad, "FP32", [0.0])), {}, ["shape"]
    for bad in ("FP128", "", None, 5, "fp32", ["FP32"]):
        yield ONNX, body(tensor("input", [1], bad, [0.0])), {}, ["datatype"]
    for _ in range(60):  # data: other element counts, other element types
        n = rng.choice([0, 1, 1023, 1025, 2048])
        yield ONNX, body(tensor("input", [1, 1, 32, 32], "FP32", [0.0] * n)), {}, ["elements"]
        wrong = rng.choice(["x", None, True, [], {}])
        yield ONNX, body(tensor("input", [1, 1, 32, 32], "FP32", [wrong] * 1024)), {}, ["data"]
        yield ONNX, body(tensor("input", [2], "INT32", [1.5, 2])), {}, ["data"]
    for header_length in ("99999", "-1", "x", "1e3"):  # binary framing that does not add up
        yield (
            MODEL,
            *binary_images([png])[:1],
            {"Inference-Header-Content-Length": header_length},
            ["inference-header-content-length"],
        )
    head = body(tensor("image", [1, 1], "BYTES", binary_data_size=5000))
    yield MODEL, head + png[:100], {"Inference-Header-Content-Length": str(len(head))}, ["binary"]
    head = body(tensor("input", [1, 1, 32, 32], "FP32", binary_data_size=100))
    yield ONNX, head + bytes(100), {"Inference-Header-Content-Length": str(len(head))}, ["binary"]
    for _ in range(20):  # images above max_image_bytes; .npy headers declaring huge arrays
        big = png[:8] + rng.randbytes(rng.randrange(MAX_IMAGE + 1, MAX_REQUEST - 1000))
        yield MODEL, *binary_images([big]), ["above the limit", "max_image_bytes"]
        npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118)
        npy += b"{'descr': '|u1', 'fortran_order': False, 'shape': (100000, 100000), }".ljust(117)
        yield MODEL, *binary_images([npy + b"\n" + bytes(64)]), [".npy header declares"]
    for _ in range(300):  # field mutations of bad requests (1023 values, no image): any 4xx
        if rng.random() < 0.5:
            request = json.loads(body(tensor("input", [1, 1, 32, 32], "FP32", [0.0] * 1023)))
        else:
            request = json.loads(body(tensor("image", [1, 1], "BYTES", ["x"])))
        where = rng.choice(["name", "shape", "datatype", "data", "parameters", "top"])
        if where == "top":
            request[rng.choice(["inputs", "outputs", "id", "parameters"])] = random_json(rng)
        else:
            request["inputs"][0][where] = random_json(rng)
        model = ONNX if request["inputs"] and "input" in str(request) else MODEL
        yield model, json.dumps(request).encode(), {}, []


def grpc_cases(rng: random.Random, png: bytes) -> list[tuple[str, str, np.ndarray, str, str]]:
    """(model, input, array, datatype, the word the error must name) for malformed gRPC
    requests: random and truncated images, images above max_image_bytes, wrong shapes,
    dtypes, input and model names."""

    def image(data: bytes, word: str = "image[0]") -> tuple[str, str, np.ndarray, str, str]:
        return MODEL, "image", np.array([[data]], object), "BYTES", word

    cases = [image(rng.randbytes(rng.randrange(1, 999))) for _ in range(60)]
    cases += [image(cut) for cut in undecodable_truncations(rng, png, 20)]
    cases += [image(png + bytes(MAX_IMAGE), "max_image_bytes")] * 5
    shapes = [([1, 1, 16, 16], "input"), ([33, 1, 32, 32], "batch"), ([0, 1, 32, 32], "input")]
    shapes += [([1, 32, 32], "input")]
    cases += [(ONNX, "input", np.zeros(s, np.float32), "FP32", w) for s, w in shapes] * 5
    tensor = np.zeros((1, 1, 32, 32), np.float32)
    cases += [
        (ONNX, "input", tensor.astype(np.float64), "FP64", "FP64"),
        (ONNX, "nope", tensor, "FP32", "nope"),
        ("no-such-model", "input", tensor, "FP32", "no-such-model"),
    ] * 10
    return cases


def post(conn: http.client.HTTPConnection, path: str, data: bytes, headers: dict):
    conn.request("POST", path, body=data, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def check(label: str, status: int, payload: bytes, words: list[str], failures: list) -> None:
    try:
        message = json.loads(payload)["error"]
    except (ValueError, KeyError, TypeError):
        message = None
    ok = 400 <= status < 500 and isinstance(message, str) and len(message) > 3
    if not (ok and all(w.lower() in message.lower() for w in words)):
        failures.append((label, status, words, payload[:300]))


def test_every_malformed_request_is_refused_and_the_server_lives(
    server, tiny_classifier_spec, tiny_classifier_onnx
):
    rng = random.Random(20261130)
    images = {"png": encoded("png"), "dicom": encoded("dicom")}
    images |= {p.name: p.read_bytes() for p in sorted(SAMPLES.glob("*"))[:3] if p.is_file()}
    pid, guard_pid, failures, counts = server.pid, server.guard_pid, [], {"http": 0, "grpc": 0}
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    for model, data, headers, words in http_cases(rng, images):
        counts["http"] += 1
        try:
            status, payload = post(conn, INFER.format(model), data, headers)
        except (OSError, http.client.HTTPException) as exc:  # a dropped connection fails too
            failures.append((model, "dropped", words, repr(exc)))
            conn.close()
            continue
        check(model, status, payload, words, failures)
    for size in (MAX_REQUEST + 1, 5 * MAX_REQUEST):  # oversized bodies, fresh connections: 413
        fresh = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        status, payload = post(fresh, INFER.format(MODEL), bytes(size), {})
        check("oversized", status, payload, ["limit"], failures)
        fresh.close()
    bomb = gzip.compress(bytes(20 * MAX_REQUEST))  # 20 MiB of zeros in ~20 KiB
    status, payload = post(conn, INFER.format(MODEL), bomb, {"Content-Encoding": "gzip"})
    check("gzip bomb", status, payload, ["limit"], failures)
    conn.close()
    counts["http"] += 3

    client = grpcclient.InferenceServerClient(url=server.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_url))
    for model, name, array, datatype, word in grpc_cases(rng, images["png"]):
        counts["grpc"] += 1
        inp = grpcclient.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        try:
            client.infer(model, [inp])
            failures.append((f"grpc {model}", "accepted", word, ""))
        except InferenceServerException as exc:
            code = str(exc.status()).removeprefix("StatusCode.")
            if code not in GRPC_CLIENT_ERRORS or word.lower() not in exc.message().lower():
                failures.append((f"grpc {model}", code, word, exc.message()[:300]))
    for shape in ([1000000, 3, 64, 64], [2**40, 2**20], [2**62, 4]):  # the huge shape over gRPC
        counts["grpc"] += 1
        request = service_pb2.ModelInferRequest(model_name=ONNX)
        request.inputs.add(name="input", datatype="FP32", shape=shape)
        request.raw_input_contents.append(bytes(8))
        try:
            stub.ModelInfer(request, timeout=30)
            failures.append(("grpc huge", "accepted", shape, ""))
        except grpc.RpcError as exc:
            if exc.code().name not in GRPC_CLIENT_ERRORS:
                failures.append(("grpc huge", exc.code().name, shape, exc.details()))
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {counts['http']} HTTP + {counts['grpc']} gRPC requests in {elapsed:.1f} s")

    assert not failures, f"{len(failures)} not refused as expected, e.g.:\n" + "\n".join(
        map(str, {(f[0], f[1], str(f[3])[:70]): f for f in failures}.values())
    )
    assert sum(counts.values()) >= 2000
    assert server.running() and (server.pid, server.guard_pid) == (pid, guard_pid)
    expected = in_process(tiny_classifier_spec, tiny_classifier_onnx, images["png"])
    got = infer_bytes(client, grpcclient, MODEL, [images["png"]])[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    status, payload = post(conn, INFER.format(MODEL), *binary_images([images["png"]]))
    conn.close()
    assert status == 200, payload[:300]
    got = json.loads(payload)["outputs"][0]["data"]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    client.close()
