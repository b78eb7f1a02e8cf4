"""Latency with and without the class activation maps, one request at a time through Triton.

Exports one DenseNet-121 (random weights: the latency does not depend on them) twice, with
the ``cam`` output (``CamHead``) and without it (``ProbabilityHead``, a model exported
before the maps), serves both from one embedded tritonserver on free loopback ports, and
times one PNG per request over gRPC, the cases interleaved request by request: the ensemble without maps; the
ensemble with maps asked for the probabilities only; and for both outputs. The same for
float32 tensors sent to each ``NAME_onnx`` (where the Python backend runs only the outputs
asked for). Prints p50 / p90 / p99 in ms and writes no file::

    python benchmarks/cam_latency.py --image-size 64 --requests 200 --rounds 4
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np


def _export(workdir: Path, image_size: int):
    import torch

    from serving.export.onnx import export_onnx
    from serving.repository.layout import write_model_set
    from serving.repository.model_config import RepositoryOptions
    from training.cam import CamHead
    from training.model import ProbabilityHead, build_model
    from training.spec import CAM_NAME, ModelSpec

    torch.manual_seed(0)
    head = ProbabilityHead(build_model(1, 2), False).eval()
    base = ModelSpec("pneumoniamnist", "binary-class", ("normal", "pneumonia"), image_size, 1)
    opts = RepositoryOptions(max_batch_size=8)
    specs = {}
    for name, module, cam in (
        ("with-cam", CamHead.from_head(head), CAM_NAME),
        ("without-cam", head, ""),
    ):
        spec = base.with_fields(name=name, cam_name=cam)
        path = export_onnx(module, spec, workdir / f"{name}.onnx", max_batch_size=8)
        write_model_set(workdir / "repository", spec, path, opts)
        specs[name] = spec
    return specs


def _png(image_size: int) -> bytes:
    from PIL import Image

    ramp = np.linspace(0, 255, image_size, dtype=np.float32)
    buffer = io.BytesIO()
    Image.fromarray(((ramp[None, :] + ramp[:, None]) / 2).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--requests", type=int, default=200, help="per case and round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)

    from serving.clients.contract import bytes_batch
    from serving.clients.sync import TritonClassifier
    from serving.server.network import find_free_port
    from serving.server.process import TritonServer

    with tempfile.TemporaryDirectory(prefix="medimg-cam-latency-") as tmp:
        workdir = Path(tmp)
        specs = _export(workdir, args.image_size)
        ports = {k: find_free_port() for k in ("http_port", "grpc_port", "metrics_port")}
        server = TritonServer(workdir / "repository", log_file=workdir / "server.log", **ports)
        server.start()
        try:
            server.wait_ready(timeout=180)
            png = bytes_batch([_png(args.image_size)])
            size = args.image_size
            tensor = np.random.default_rng(0).normal(size=(1, 1, size, size)).astype(np.float32)
            clients = {n: TritonClassifier(server.grpc_url, "grpc", n) for n in specs}
            cases = {
                "ensemble, no cam output": ("without-cam", png, ("probabilities",)),
                "ensemble with cam, probabilities asked": ("with-cam", png, ("probabilities",)),
                "ensemble with cam, both asked": ("with-cam", png, ("probabilities", "cam")),
                "NAME_onnx, no cam output": ("without-cam", tensor, ("probabilities",)),
                "NAME_onnx with cam, probabilities asked": (
                    "with-cam",
                    tensor,
                    ("probabilities",),
                ),
                "NAME_onnx with cam, both asked": ("with-cam", tensor, ("probabilities", "cam")),
            }
            times: dict[str, list[float]] = {case: [] for case in cases}
            for name, array, outputs in cases.values():  # warm every path
                for _ in range(10):
                    clients[name].infer_outputs(array, outputs)
            # case after case, request by request: a load that comes and goes (a shared
            # machine) falls on every case alike
            for _ in range(args.rounds * args.requests):
                for case, (name, array, outputs) in cases.items():
                    started = time.perf_counter()
                    clients[name].infer_outputs(array, outputs)
                    times[case].append((time.perf_counter() - started) * 1e3)
            for client in clients.values():
                client.close()
        finally:
            server.stop()
    print(
        f"DenseNet-121 {args.image_size} px, gRPC, concurrency 1, {args.rounds} rounds x "
        f"{args.requests} requests per case (ms)"
    )
    for case, values in times.items():
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        print(f"  {case:<42} p50 {p50:6.2f}  p90 {p90:6.2f}  p99 {p99:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
