"""What a trained classifier expects and returns: the contract between training,
export, the Triton model repository and every client.

It travels with the checkpoint, in the MLflow model's metadata, and in the Triton
``config.pbtxt`` (parameter ``medimg_spec``), so a client needs only the server::

    python -c "from training.spec import ModelSpec; print(ModelSpec.for_dataset('pneumoniamnist', 64).to_json())"
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from training.errors import ConfigError
from training.transforms import SourceChain, normalization_stats, to_model_input

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
CAM_NAME = "cam"  # the second output: class activation maps (N, K, h, w)
# The finding of each binary MedMNIST data set: what sensitivity, PPV and triage are about.
POSITIVE_CLASSES = {"pneumoniamnist": "pneumonia", "breastmnist": "malignant"}
# How MedMNIST made each data set's images from the source images (its INFO descriptions and
# on_medmnist_plus.md): the centred square of the short edge, then resized; the others
# resized whole (BloodMNIST's fixed 200 x 200 centre crop of 360 x 363 photos is not
# reproduced: "none"). medimg applies the same to a served image larger than the file size.
MEDMNIST_CROPS = {"pneumoniamnist": "center", "octmnist": "center", "retinamnist": "center"}
# A binary folder data set whose other class is named like one of these needs no --positive-class.
NEGATIVE_NAMES = re.compile(r"normal|healthy|benign|negative|no[ _-]?finding|control", re.I)
log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # models warned about a missing positive class (once each)


def positive_class_for(
    dataset: str, task: str, class_names: tuple[str, ...], given: str = ""
) -> str:
    """The positive class (the finding) of a binary task: ``given`` (a class name, any case),
    else :data:`POSITIVE_CLASSES`, else the one class of two not named like normal/healthy/
    benign. Other tasks: "" (every class is one-vs-rest positive)."""
    if not task.startswith("binary"):
        if given:
            raise ConfigError(f"positive_class: only binary tasks have one; {dataset} is {task}")
        return ""
    if given:
        for name in class_names:
            if name.lower() == given.lower():
                return name
        raise ConfigError(
            f"positive_class: {given!r} is not a class of {dataset} ({list(class_names)})"
        )
    if dataset in POSITIVE_CLASSES and POSITIVE_CLASSES[dataset] in class_names:
        return POSITIVE_CLASSES[dataset]
    negatives = [n for n in class_names if NEGATIVE_NAMES.search(n)]
    if len(negatives) == 1:
        return next(n for n in class_names if n != negatives[0])
    raise ConfigError(
        f"positive_class: cannot tell which class of {dataset} ({list(class_names)}) is the finding; "
        "name it with --positive-class NAME"
    )


@dataclass(frozen=True)
class ModelSpec:
    dataset: str
    task: str  # medmnist task: "binary-class", "multi-class", "multi-label, binary-class", ...
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    mean: tuple[float, ...] = (0.5,)  # per channel (one value: every channel)
    std: tuple[float, ...] = (0.5,)
    architecture: str = "densenet121"
    name: str = ""  # registered / served name; default "<dataset>-<architecture>"
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    extra: dict = field(default_factory=dict)
    positive_class: str = ""  # binary: the finding; "" in versions before it (label 1 is used)
    temperature: tuple[float, ...] = ()  # calibration: one (softmax) or one per label; (): none
    thresholds: tuple[float, ...] = ()  # operating thresholds on calibrated P(finding) from val
    review: dict = field(default_factory=dict)  # training.review statistics of the val split
    cam_name: str = ""  # the class-activation-map output, "" when the model has none
    # how the training images were made from larger ones (training.transforms.SourceChain):
    # a larger input is cropped ("center": the short edge's square) and reduced to
    # source_size px first; ("none", 0) in versions before it: resized straight to image_size
    source_crop: str = "none"
    source_size: int = 0

    @property
    def positive_index(self) -> int:
        """Column of the finding in the probabilities (binary; label 1 for old versions)."""
        if self.positive_class:
            return self.class_names.index(self.positive_class)
        if self.task.startswith("binary") and self.model_name not in _WARNED:
            _WARNED.add(self.model_name)
            log.warning(
                "%s: its spec names no positive class (trained before it was recorded); "
                "label 1 (%s) is used as the finding",
                self.model_name,
                self.class_names[-1],
            )
        return self.num_classes - 1

    @property
    def finding(self) -> str:
        """The positive class of a binary task ('' for other tasks)."""
        return self.class_names[self.positive_index] if self.task.startswith("binary") else ""

    @property
    def operating_threshold(self) -> float | None:
        """Binary tasks: the threshold on P(finding) chosen on validation; None otherwise."""
        binary = self.task.startswith("binary") and self.thresholds
        return float(self.thresholds[0]) if binary else None

    def predicted(self, probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """The predicted class index of each row of ``probs`` ((N, K) or (K,)): a binary
        task's finding where P(finding) >= ``threshold`` (None: :attr:`operating_threshold`),
        else the other class; the arg-max for other tasks and specs without a threshold."""
        probs = np.asarray(probs)
        threshold = self.operating_threshold if threshold is None else threshold
        if threshold is None or not self.task.startswith("binary"):
            return np.argmax(probs, axis=-1)
        positive = self.positive_index
        return np.where(probs[..., positive] >= threshold, positive, 1 - positive)

    def temperatures(self):
        """The temperature per output column as a float32 array (1.0: uncalibrated)."""
        t = np.asarray(self.temperature or (1.0,), dtype=np.float32)
        return np.broadcast_to(t, (self.num_classes,)) if self.multi_label else t[:1]

    def with_fields(self, **changes) -> ModelSpec:
        return replace(self, **changes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def multi_label(self) -> bool:
        return self.task.startswith("multi-label")

    @property
    def model_name(self) -> str:
        """Registered MLflow model name, also the Triton model name."""
        return self.name or f"{self.dataset}-{self.architecture}"

    @property
    def source_chain(self) -> SourceChain | None:
        """The crop and reduction a larger input goes through first (None: nothing)."""
        if self.source_crop == "none" and not self.source_size:
            return None
        return SourceChain(self.source_crop, self.source_size)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W[, C]) -> the float32 (N, C, S, S) batch this model expects:
        through :attr:`source_chain`, then resized and normalised as in training."""
        return to_model_input(
            images,
            self.image_size,
            self.channels,
            mean=self.mean,
            std=self.std,
            source=self.source_chain,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        try:
            values = dict(data)
            values["class_names"] = tuple(values["class_names"])
            for key in ("temperature", "thresholds"):
                if key in values:
                    values[key] = tuple(float(x) for x in values[key])
            for key in ("mean", "std"):  # JSON lists; a float in specs written before 0.2
                if key in values:
                    v = values[key]
                    values[key] = tuple(v) if isinstance(v, list | tuple) else (float(v),)
            return cls(**values)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"model spec: malformed ({exc}); got keys {sorted(data)}") from exc

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model spec: not JSON ({exc})") from exc

    @classmethod
    def for_dataset(
        cls,
        dataset: str,
        image_size: int,
        *,
        data_dir: str = "",
        normalization: str = "medmnist",
        name: str = "",
        positive_class: str = "",
        size: int = 28,
        crop: str = "",
    ) -> ModelSpec:
        """``size``: a MedMNIST data set's file resolution; ``crop``: "" for the data set's
        own chain (:data:`MEDMNIST_CROPS`; file-based data sets: none), "center" or "none"."""
        from training.data import FILE_DATASETS, dataset_info

        info = dataset_info(dataset, data_dir)
        mean, std = normalization_stats(normalization, info.channels)
        medmnist = info.name not in FILE_DATASETS
        return cls(
            source_crop=crop or (MEDMNIST_CROPS.get(info.name, "none") if medmnist else "none"),
            source_size=size if medmnist else 0,
            positive_class=positive_class_for(
                info.name, info.task, info.class_names, positive_class
            ),
            dataset=info.name,
            task=info.task,
            class_names=info.class_names,
            image_size=image_size,
            channels=info.channels,
            mean=mean,
            std=std,
            name=name,
        )

    @classmethod
    def for_config(cls, cfg) -> ModelSpec:  # cfg: training.config.TrainConfig
        return cls.for_dataset(
            cfg.dataset,
            cfg.image_size,
            data_dir=cfg.data_dir,
            normalization=cfg.normalization,
            name=cfg.model_name,
            positive_class=cfg.positive_class,
            size=cfg.size,
            crop=cfg.crop,
        )
