"""Triton's own tooling against a medimg repository: ``NAME_onnx`` declares its input
layout (``format: FORMAT_NCHW``, as Triton's ``densenet_onnx`` example does), so the stock
example client ``image_client.py`` of github.com/triton-inference-server/client, which reads
the model's metadata and config, classifies through it; the requirements that client
checks are also checked here on the served metadata and config, without it::

    TRITON_CLIENT_REPO=~/src/triton-client python -m pytest -q tests/integration/test_triton_example_client.py

The client's file is never copied into this project: it is read from a checkout named by
``$TRITON_CLIENT_REPO`` (a work tree, or a bare clone whose HEAD is read with git), and the
test that runs it skips, saying so, where there is none.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as mc
from PIL import Image

from tests.fixtures.triton import MODEL, server_fixture

pytestmark = pytest.mark.timeout(300)
CLASSIFIER = f"{MODEL}_onnx"
CLIENT_PATH = "src/python/examples/image_client.py"

server = server_fixture()


def _image_client(tmp_path: Path) -> Path | None:
    """Triton's image_client.py from ``$TRITON_CLIENT_REPO`` (work tree or bare clone)."""
    repo = os.environ.get("TRITON_CLIENT_REPO", "")
    if not repo:
        return None
    root = Path(repo).expanduser()
    if (root / CLIENT_PATH).is_file():
        return root / CLIENT_PATH
    shown = subprocess.run(
        ["git", "--git-dir", str(root), "show", f"HEAD:{CLIENT_PATH}"],
        capture_output=True,
        text=True,
    )
    if shown.returncode:
        return None
    path = tmp_path / "image_client.py"
    path.write_text(shown.stdout)
    return path


def test_the_classifier_declares_what_image_client_checks(server) -> None:
    """image_client.py's parse_model, as conditions on the served model: one input of 3
    dims (not counting the batch) in FORMAT_NCHW or FORMAT_NHWC, one FP32 vector output."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        meta = client.get_model_metadata(CLASSIFIER)
        config = client.get_model_config(CLASSIFIER).config
    finally:
        client.close()
    assert len(meta.inputs) == 1 and len(config.input) == 1 and len(meta.outputs) == 1
    assert config.input[0].format == mc.ModelInput.FORMAT_NCHW
    batch = 1 if config.max_batch_size > 0 else 0
    assert len(meta.inputs[0].shape) == 3 + batch
    assert meta.outputs[0].datatype == "FP32"
    assert sum(d > 1 for d in meta.outputs[0].shape[batch:]) == 1
    c, h, w = meta.inputs[0].shape[batch:]
    assert (c, h, w) == (1, 32, 32)


def test_triton_image_client_classifies(server, tmp_path: Path) -> None:
    """Over gRPC: its HTTP path imports ``attrdict``, which does not import on Python >= 3.10
    (collections.Mapping), whatever the model."""
    script = _image_client(tmp_path)
    if script is None:
        pytest.skip(
            "Triton's example image_client.py not found: set TRITON_CLIENT_REPO to a checkout "
            "(or bare clone) of github.com/triton-inference-server/client"
        )
    rng = np.random.default_rng(0)
    image = tmp_path / "xray.png"
    Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(image)
    args = ["-m", CLASSIFIER, "-c", "2", "-s", "NONE", "-u", server.grpc_url, "-i", "gRPC"]
    result = subprocess.run(
        [sys.executable, str(script), *args, str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # "    0.73 (1) = pneumonia" for each of the two classes, most likely first
    found = re.findall(r"^\s+([\d.]+) \((\d)\) = (\w+)$", result.stdout, re.M)
    assert [name for _, _, name in found] in (["normal", "pneumonia"], ["pneumonia", "normal"])
    probs = [float(p) for p, _, _ in found]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-3)
