"""What a trained classifier expects and returns: the contract between training,
export, the Triton model repository and every client.

It travels with the checkpoint, in the MLflow model's metadata, and in the Triton
``config.pbtxt`` (parameter ``medimg_spec``), so a client needs only the server::

    python -c "from training.spec import ModelSpec; print(ModelSpec.for_dataset('pneumoniamnist', 64).to_json())"
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from training.errors import ConfigError
from training.transforms import normalization_stats, to_model_input

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"


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

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W[, C]) -> the float32 (N, C, S, S) batch this model expects."""
        return to_model_input(images, self.image_size, self.channels, mean=self.mean, std=self.std)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        try:
            values = dict(data)
            values["class_names"] = tuple(values["class_names"])
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
    ) -> ModelSpec:
        from training.data import dataset_info

        info = dataset_info(dataset, data_dir)
        mean, std = normalization_stats(normalization, info.channels)
        return cls(
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
        )
