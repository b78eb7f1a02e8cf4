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

from serving.repository.layout import ONNX_FILE, ModelSet, RepositoryOptions, write_model_set
from training.data import DataOptions, open_split
from training.errors import ExportError
from training.registry import LoadedModel
from training.spec import ModelSpec

log = logging.getLogger(__name__)
PARITY_ATOL = 1e-4


@dataclass
class ExportReport:
    onnx_path: Path
    models: ModelSet
    max_abs_diff: float
    parity_batches: tuple[int, ...]
    fp16_max_abs_diff: float | None = None  # the served float16 variant against fp32

    @property
    def model_dir(self) -> Path:  # the ensemble clients call
        return self.models.ensemble

    @property
    def version(self) -> int:
        return self.models.version


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
            diff = float(np.max(np.abs(got - expected)))
            worst = max(worst, diff if np.isfinite(diff) else float("inf"))  # NaN fails
    return worst


def parity_images(spec: ModelSpec, data_dir: str, count: int) -> np.ndarray:
    """``count`` real validation images of the model's data set, preprocessed."""
    split = open_split(
        DataOptions(spec.dataset, data_dir), "val", image_size=spec.image_size, max_samples=count
    )
    return split.model_input(spec.mean, spec.std)[:count]


def export_model(
    loaded: LoadedModel,
    repository: Path,
    *,
    data_dir: str,
    options: RepositoryOptions | None = None,
    version: int | None = None,
    fp16: bool = False,
) -> ExportReport:
    """Export, check parity, and write ``loaded`` into the Triton ``repository`` as the
    next version (or ``version``) of ``NAME_onnx`` + ``NAME_preprocess`` + ensemble ``NAME``."""
    options = options or RepositoryOptions()
    max_batch_size = options.max_batch_size
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
        fp16_diff = None
        if fp16:
            from serving.export.fp16 import FP16_PARITY_ATOL, convert_fp16, fp16_parity

            half = convert_fp16(onnx_path, Path(tmp) / "model_fp16.onnx")
            fp16_diff = fp16_parity(onnx_path, half, images)
            log.info("fp16 parity %s: max abs diff %.3g", spec.model_name, fp16_diff)
            if not fp16_diff <= FP16_PARITY_ATOL:
                raise ExportError(
                    f"{spec.model_name}: the float16 variant differs from float32 by "
                    f"{fp16_diff:.3g} (max abs, allowed {FP16_PARITY_ATOL}) on {len(images)} "
                    "real images; export without --fp16"
                )
            onnx_path = half
        models = write_model_set(Path(repository), spec, onnx_path, options, version=version)
    return ExportReport(
        onnx_path=models.classifier / str(models.version) / ONNX_FILE,
        models=models,
        max_abs_diff=diff,
        parity_batches=batches,
        fp16_max_abs_diff=fp16_diff,
    )
