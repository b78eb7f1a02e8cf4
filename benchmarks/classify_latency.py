"""Single-image classification latency through Triton, HTTP vs gRPC, beside in-process ONNX Runtime.

Starts the embedded tritonserver on free loopback ports over an exported
repository, then, side by side in this one process: one image per request through
:class:`serving.clients.sync.TritonClassifier` (read + preprocess + infer), the same
file read, preprocessed and run through ONNX Runtime in process, and the whole ``medimg classify`` command
(process start included)::

    python benchmarks/classify_latency.py --repository model_repository \
        --image ../shared/data/samples/00000001_000.png --requests 200
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def percentiles(samples: list[float]) -> str:
    ms = np.asarray(samples) * 1000
    return (
        f"p50 {np.percentile(ms, 50):6.2f} ms  p90 {np.percentile(ms, 90):6.2f} ms  "
        f"p99 {np.percentile(ms, 99):6.2f} ms  ({len(ms)} requests)"
    )


def main() -> int:
    from serving.clients.sync import TritonClassifier
    from serving.repository.layout import list_models
    from serving.server.process import TritonServer, find_free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--image", default="../shared/data/samples/00000001_000.png")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--cli-runs", type=int, default=5)
    args = parser.parse_args()
    repository = Path(args.repository)
    model = list_models(repository)[0]
    import onnxruntime as ort

    versions = sorted(
        (p for p in (repository / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
    session = ort.InferenceSession(
        str(versions[-1] / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    ports = [find_free_port() for _ in range(3)]
    with TritonServer(
        repository, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2]
    ) as server:
        urls = {"http": f"127.0.0.1:{ports[0]}", "grpc": server.grpc_url}
        results: dict[str, list[float]] = {"http": [], "grpc": [], "inprocess": []}
        clients = {p: TritonClassifier(urls[p], p, model) for p in ("http", "grpc")}
        from training.images import read_image

        x = clients["http"].preprocess(read_image(args.image))
        for _ in range(10):  # warm up every path
            for client in clients.values():
                client.classify_files([args.image])
            session.run(None, {"input": x})
        for _ in range(args.requests):  # interleaved, so machine noise hits all three alike
            for protocol, client in clients.items():
                t = time.perf_counter()
                (pred,) = client.classify_files([args.image])
                results[protocol].append(time.perf_counter() - t)
                assert not pred.error, pred.error
            t = time.perf_counter()  # the same work in process: read, preprocess, infer
            session.run(None, {"input": clients["http"].preprocess(read_image(args.image))})
            results["inprocess"].append(time.perf_counter() - t)
        cli = {}
        for protocol in ("http", "grpc"):
            times = []
            for _ in range(args.cli_runs):
                t = time.perf_counter()
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "serving.cli",
                        "classify",
                        args.image,
                        "--url",
                        urls[protocol],
                        "--protocol",
                        protocol,
                    ],
                    check=True,
                    capture_output=True,
                )
                times.append(time.perf_counter() - t)
            cli[protocol] = statistics.median(times)
        for client in clients.values():
            client.close()

    print(f"model {model}, image {args.image}")
    for name in ("http", "grpc", "inprocess"):
        label = {"http": "Triton HTTP  ", "grpc": "Triton gRPC  ", "inprocess": "ORT in-process"}[
            name
        ]
        print(f"{label} {percentiles(results[name])}")
    print(
        f"medimg classify (whole command, median of {args.cli_runs}): HTTP {cli['http']:.2f} s  gRPC {cli['grpc']:.2f} s"
    )
    p50 = {k: float(np.percentile(v, 50)) for k, v in results.items()}
    print(
        f"http_p50/grpc_p50={p50['http'] / p50['grpc']:.2f} grpc_p50/inprocess_p50={p50['grpc'] / p50['inprocess']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
