"""Export a registered MLflow model to ONNX, check it, and write the Triton repository.

The ONNX graph has a dynamic batch axis, passes ``onnx.checker``, and must match
PyTorch on real images of the model's data set (max abs diff <= 1e-4 at batch
sizes 1, 7 and ``max_batch_size``), else :class:`ExportError`::

    medimg export --model pneumoniamnist-densenet121 --repository model_repository
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.data import prepare_split
from training.errors import ExportError
from training.registry import LoadedModel
from training.spec import ModelSpec

log = logging.getLogger(__name__)
PARITY_ATOL = 1e-4


@dataclass
class ExportReport:
    onnx_path: Path
    model_dir: Path
    version: int
    max_abs_diff: float
    parity_batches: tuple[int, ...]


def export_onnx(
    module: torch.nn.Module, spec: ModelSpec, path: Path, *, max_batch_size: int
) -> Path:
    """``module`` (returning probabilities) -> ONNX file with a dynamic batch axis."""
    import onnx

    example = torch.zeros(2, spec.channels, spec.image_size, spec.image_size)
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch_size))
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=True,
                external_data=False,
                input_names=[spec.input_name],
                output_names=[spec.output_name],
                dynamic_shapes=({0: batch},),
            )
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(
            f"ONNX export of {spec.model_name} to {path} failed: {type(exc).__name__}: {exc}"
        ) from exc
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [spec.input_name] or outputs != [spec.output_name]:
        raise ExportError(
            f"{path}: expected input {spec.input_name!r} and output {spec.output_name!r}, "
            f"got inputs {inputs} and outputs {outputs}"
        )
    return path


def parity(
    module: torch.nn.Module, onnx_path: Path, images: np.ndarray, batches: tuple[int, ...]
) -> float:
    """Max abs difference between PyTorch and ONNX Runtime over batches of ``images``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    worst = 0.0
    with torch.no_grad():
        for n in batches:
            x = images[:n]
            expected = module(torch.from_numpy(x)).numpy()
            got = session.run(None, {input_name: x})[0]
            if got.shape != expected.shape:
                raise ExportError(
                    f"{onnx_path}: batch {n}: ONNX output shape {got.shape}, PyTorch {expected.shape}"
                )
            worst = max(worst, float(np.max(np.abs(got - expected))))
    return worst


def parity_images(spec: ModelSpec, data_dir: str, count: int) -> np.ndarray:
    """``count`` real validation images of the model's data set, preprocessed."""
    split = prepare_split(
        spec.dataset,
        "val",
        data_dir,
        image_size=spec.image_size,
        max_samples=count,
        mean=spec.mean,
        std=spec.std,
    )
    return split.x[:count]


def export_model(
    loaded: LoadedModel,
    repository: Path,
    *,
    data_dir: str,
    max_batch_size: int = 32,
    version: int | None = None,
) -> ExportReport:
    """Export, check parity, and write ``loaded`` into the Triton ``repository``."""
    from serving.repository import write_classifier

    spec = loaded.spec
    images = parity_images(spec, data_dir, max_batch_size)
    batches = tuple(sorted({1, min(7, len(images)), len(images)}))
    with tempfile.TemporaryDirectory(prefix="medimg-export-") as tmp:
        onnx_path = export_onnx(
            loaded.module, spec, Path(tmp) / "model.onnx", max_batch_size=max_batch_size
        )
        diff = parity(loaded.module, onnx_path, images, batches)
        log.info("parity %s: max abs diff %.3g at batch sizes %s", spec.model_name, diff, batches)
        if not diff <= PARITY_ATOL:
            raise ExportError(
                f"{spec.model_name}: ONNX Runtime differs from PyTorch by {diff:.3g} "
                f"(max abs, allowed {PARITY_ATOL}) on {len(images)} real images"
            )
        if version is None:
            version = next_version(repository / spec.model_name)
        model_dir = write_classifier(
            repository, spec, onnx_path, version=version, max_batch_size=max_batch_size
        )
    return ExportReport(
        onnx_path=model_dir / str(version) / "model.onnx",
        model_dir=model_dir,
        version=version,
        max_abs_diff=diff,
        parity_batches=batches,
    )


def next_version(model_dir: Path) -> int:
    """One past the highest numeric version directory (1 for a new model)."""
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1
