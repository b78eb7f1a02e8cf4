"""What a trained classifier expects and returns: the contract between training,
export, the Triton model repository and every client.

It travels with the checkpoint, in the MLflow model's metadata, and in the Triton
``config.pbtxt`` (parameter ``medimg_spec``), so a client needs only the server::

    python -c "from training.spec import ModelSpec; print(ModelSpec.for_dataset('pneumoniamnist', 64).to_json())"
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from training.errors import ConfigError
from training.transforms import MEAN, STD

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"


@dataclass(frozen=True)
class ModelSpec:
    dataset: str
    task: str  # medmnist task: "binary-class", "multi-class", "multi-label, binary-class", ...
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    mean: float = MEAN
    std: float = STD
    architecture: str = "densenet121"
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
        return f"{self.dataset}-{self.architecture}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        try:
            values = dict(data)
            values["class_names"] = tuple(values["class_names"])
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
    def for_dataset(cls, dataset: str, image_size: int) -> ModelSpec:
        from training.data import dataset_info

        info = dataset_info(dataset)
        labels = info["label"]
        names = tuple(labels[k] for k in sorted(labels, key=int))
        return cls(
            dataset=dataset,
            task=info["task"],
            class_names=names,
            image_size=image_size,
            channels=int(info["n_channels"]),
        )
