"""The naive serving baseline of ``benchmarks/serving_side_by_side.py``: FastAPI + PyTorch
eager, one request one forward pass, no batching, no ONNX.

``POST /predict`` takes the raw bytes of a C-order float32 tensor (n, C, S, S) -- the
preprocessed input the model's spec describes -- and answers JSON
``{"probabilities": [[...], ...]}``; ``GET /health`` answers ``{"ok": true}`` once the
model is loaded. The endpoint is ``async`` and runs the forward pass on the event loop,
so requests are served one at a time (what a first FastAPI deployment does). Weights
come from :func:`training.model.save_weights` (state dict + spec); the side-by-side
benchmark starts it as its own uvicorn process (``serving.cli.naive_server``) and stops it
by its PID::

    python -m serving.cli.naive_server --weights /tmp/densenet.pt --port 8500
    curl -s 127.0.0.1:8500/health
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from torch import nn

from training.model import ProbabilityHead, build_model, load_weights
from training.spec import ModelSpec


def load_module(weights: Path) -> tuple[nn.Module, ModelSpec]:
    """The probability-returning DenseNet-121 and its spec from a ``save_weights`` file."""
    state, spec_json = load_weights(weights)
    spec = ModelSpec.from_json(spec_json)
    model = build_model(spec.channels, spec.num_classes)
    model.load_state_dict(state)
    return ProbabilityHead(model, spec.multi_label).eval(), spec


def create_app(module: nn.Module, spec: ModelSpec) -> FastAPI:
    """A FastAPI app serving ``module``: one request, one eager forward pass.

    (FastAPI resolves the handlers' annotations in this module's globals: ``Request``
    must be imported at module level.)"""
    app = FastAPI(title="medimg naive baseline")
    item = spec.channels * spec.image_size * spec.image_size * 4  # float32 bytes per image

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        body = await request.body()
        if not body or len(body) % item:
            raise HTTPException(
                400,
                f"body: expected n * {item} bytes of float32 (n, {spec.channels}, "
                f"{spec.image_size}, {spec.image_size}), got {len(body)} bytes",
            )
        x = np.frombuffer(body, dtype=np.float32).reshape(
            -1, spec.channels, spec.image_size, spec.image_size
        )
        with torch.inference_mode():
            probs = module(torch.from_numpy(x.copy()))
        return {"probabilities": probs.tolist()}

    return app


def serve(weights: Path, host: str, port: int, threads: int = 0) -> None:
    """Load ``weights`` and serve them on ``host:port`` until stopped (``threads``: torch
    threads, 0 for its default)."""
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    module, spec = load_module(weights)
    with torch.inference_mode():  # first call allocates; keep it out of the measurement
        module(torch.zeros(1, spec.channels, spec.image_size, spec.image_size))
    uvicorn.run(
        create_app(module, spec),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
    )
