"""Export a registered MLflow model to ONNX, check it, and write the Triton repository.

The ONNX graph has a dynamic batch axis, passes ``onnx.checker``, and must match
PyTorch on real images of the model's data set (max abs diff <= 1e-4 at batch
sizes 1, 7 and ``max_batch_size``), else :class:`ExportError`. A DenseNet-shaped model
is exported with :class:`~training.cam.CamHead`: a second output ``cam``, the class
activation maps (N, K, h, w), held to :data:`CAM_PARITY_ATOL`; the spec written to the
repository then names it (``cam_name``)::

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
from training.spec import CAM_NAME, ModelSpec

log = logging.getLogger(__name__)
PARITY_ATOL = 1e-4
# Max abs difference allowed on the maps. They are logit contributions per location (their
# mean plus b / T is the calibrated logit), not squashed into [0, 1] like the probabilities,
# so they differ more between PyTorch and ONNX Runtime. Measured: 1.9e-6 on a DenseNet-121
# trained on blob images, at 128 px (4 x 4 maps of values up to 9.3; probabilities 3e-7);
# 1.8e-7 on the tests' pipeline model (32 px: 1 x 1 maps). 1e-3 leaves ~500x headroom and
# still catches a map computed from other weights or another layer (0.1 on a weight: > 1e-2).
CAM_PARITY_ATOL = 1e-3


@dataclass
class ExportReport:
    onnx_path: Path
    models: ModelSet
    max_abs_diff: float
    parity_batches: tuple[int, ...]
    fp16_max_abs_diff: float | None = None  # the served float16 variant against fp32
    cam_max_abs_diff: float | None = None  # the maps (None: exported without them)

    @property
    def model_dir(self) -> Path:  # the ensemble clients call
        return self.models.ensemble

    @property
    def version(self) -> int:
        return self.models.version


def output_names(spec: ModelSpec) -> list[str]:
    """The ONNX graph's outputs: the probabilities, and the maps when the spec names them."""
    return [spec.output_name, *([spec.cam_name] if spec.cam_name else [])]


def export_onnx(
    module: torch.nn.Module, spec: ModelSpec, path: Path, *, max_batch_size: int
) -> Path:
    """``module`` -> ONNX file with a dynamic batch axis. ``module`` returns the
    probabilities, or (probabilities, maps) when ``spec.cam_name`` is set."""
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
                output_names=output_names(spec),
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
    if inputs != [spec.input_name] or outputs != output_names(spec):
        raise ExportError(
            f"{path}: expected input {spec.input_name!r} and outputs {output_names(spec)}, "
            f"got inputs {inputs} and outputs {outputs}"
        )
    return path


def parity_by_output(
    module: torch.nn.Module, onnx_path: Path, images: np.ndarray, batches: tuple[int, ...]
) -> list[float]:
    """Max abs difference between PyTorch and ONNX Runtime over batches of ``images``, per
    output of ``module`` (a tensor, or a tuple of them in the graph's output order)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    worst: list[float] = []
    with torch.no_grad():
        for n in batches:
            x = images[:n]
            answer = module(torch.from_numpy(x))
            expected = [t.numpy() for t in (answer if isinstance(answer, tuple) else (answer,))]
            got = session.run(None, {input_name: x})
            if len(got) < len(expected):
                raise ExportError(
                    f"{onnx_path}: {len(got)} ONNX output(s), PyTorch {len(expected)}"
                )
            worst += [0.0] * (len(expected) - len(worst))
            for i, (g, e) in enumerate(zip(got, expected, strict=False)):
                if g.shape != e.shape:
                    raise ExportError(
                        f"{onnx_path}: batch {n}: ONNX output {i} shape {g.shape}, "
                        f"PyTorch {e.shape}"
                    )
                diff = float(np.max(np.abs(g - e)))
                worst[i] = max(worst[i], diff if np.isfinite(diff) else float("inf"))  # NaN fails
    return worst


def parity(
    module: torch.nn.Module, onnx_path: Path, images: np.ndarray, batches: tuple[int, ...]
) -> float:
    """Max abs difference of the probabilities (the first output) between PyTorch and ONNX
    Runtime over batches of ``images``."""
    return parity_by_output(module, onnx_path, images, batches)[0]


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
    cam: bool | None = None,
) -> ExportReport:
    """Export, check parity, and write ``loaded`` into the Triton ``repository`` as the
    next version (or ``version``) of ``NAME_onnx`` + ``NAME_preprocess`` + ensemble ``NAME``.
    With ``cam`` (and a network :class:`~training.cam.CamHead` can take apart), the
    classifier has the second output ``cam`` and the written spec names it (default:
    ``options.cam``)."""
    from training.cam import CamHead

    options = options or RepositoryOptions()
    cam = options.cam if cam is None else cam
    max_batch_size = options.max_batch_size
    head = CamHead.from_head(loaded.module) if cam else None
    module: torch.nn.Module = head if head is not None else loaded.module
    spec = loaded.spec.with_fields(cam_name=CAM_NAME if head is not None else "")
    if cam and head is None:
        log.warning("%s: no class activation maps (not a DenseNet head)", spec.model_name)
    images = parity_images(spec, data_dir, max_batch_size)
    batches = tuple(sorted({1, min(7, len(images)), len(images)}))
    with tempfile.TemporaryDirectory(prefix="medimg-export-") as tmp:
        onnx_path = export_onnx(
            module, spec, Path(tmp) / "model.onnx", max_batch_size=max_batch_size
        )
        diffs = parity_by_output(module, onnx_path, images, batches)
        diff, cam_diff = diffs[0], (diffs[1] if head is not None else None)
        log.info("parity %s: max abs diff %.3g at batch sizes %s", spec.model_name, diff, batches)
        if not diff <= PARITY_ATOL:
            raise ExportError(
                f"{spec.model_name}: ONNX Runtime differs from PyTorch by {diff:.3g} "
                f"(max abs, allowed {PARITY_ATOL}) on {len(images)} real images"
            )
        if cam_diff is not None:
            log.info("parity %s: maps max abs diff %.3g", spec.model_name, cam_diff)
            if not cam_diff <= CAM_PARITY_ATOL:
                raise ExportError(
                    f"{spec.model_name}: ONNX Runtime's class activation maps differ from "
                    f"PyTorch's by {cam_diff:.3g} (max abs, allowed {CAM_PARITY_ATOL}) on "
                    f"{len(images)} real images"
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
        cam_max_abs_diff=cam_diff,
    )
