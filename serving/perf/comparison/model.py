"""The model the side-by-side serving benchmark (``benchmarks/serving_side_by_side.py``)
measures: made here (data check, brief training, ONNX export with a parity check, Triton
repository, weights for the naive baseline) or reused from ``--model-repository``; and real
preprocessed images for the in-process runs::

    python -c "from pathlib import Path; from serving.perf.comparison.model import *; \
print(config_summary(Path('model_repository'), 'pneumoniamnist-densenet121_onnx'))"
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.perf.accounting import BenchError
from serving.perf.comparison.settings import BATCH_SIZES, Settings
from serving.repository.layout import list_models, read_config, spec_from_config, write_model_set
from serving.repository.model_config import (
    RepositoryOptions,
    classifier_name,
    options_from_config,
)
from training.spec import ModelSpec


@dataclass
class Prepared:
    """The model under test: a Triton repository, its classifier and matching weights."""

    repository: Path
    classifier: str  # NAME_onnx
    spec: ModelSpec
    onnx_path: Path
    weights: Path
    notes: list[str]


# ---------------------------------------------------------------- model preparation


def check_data(dataset: str, data_dir: str) -> None:
    """Fail early, naming the file, when a MedMNIST data set is not in ``data_dir``."""
    from training.data import FILE_DATASETS, npz_path

    if dataset.lower() in FILE_DATASETS:
        if not Path(data_dir).is_dir():
            raise BenchError(f"--data-dir {data_dir} is not a directory")
        return
    path = npz_path(dataset, data_dir)
    if not path.is_file():
        raise BenchError(
            f"data file {path} not found: pass --data-dir with the folder holding "
            f"{path.name} (e.g. ../shared/data)"
        )


def train_briefly(spec, dataset: str, data_dir: str, steps: int, batch_size: int):
    """DenseNet-121 for ``spec``, trained ``steps`` steps with the plain loop of
    ``training.epoch`` (one epoch over ``steps * batch_size`` samples); 0 steps: initial weights."""
    import torch
    from torch.utils.data import DataLoader

    from training.augment import BatchTransform
    from training.config import TrainConfig
    from training.data import DataOptions, open_split
    from training.epoch import make_loss, make_optimizer, make_sampler, run_epoch
    from training.model import build_model

    torch.manual_seed(0)
    model = build_model(spec.channels, spec.num_classes)
    if steps <= 0:
        return model
    cfg = TrainConfig(
        dataset=dataset,
        data_dir=data_dir,
        image_size=spec.image_size,
        epochs=1,
        batch_size=batch_size,
        max_train_samples=steps * batch_size,
    )
    train = open_split(
        DataOptions.from_config(cfg),
        "train",
        image_size=spec.image_size,
        channels=spec.channels,
        max_samples=cfg.max_train_samples,
    )
    sampler = make_sampler(cfg, train.labels, train, 0, 1)
    loader = DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=True)
    transform = BatchTransform(cfg.augmentations, cfg.aug_strength, spec.mean, spec.std)
    stats = run_epoch(
        model,
        loader,
        transform=lambda x: transform(x, train=True),
        loss_fn=make_loss(cfg, spec, train.labels),
        optimizer=make_optimizer(cfg, model.parameters()),
        spec=spec,
        device=torch.device("cpu"),
    )
    print(
        f"trained {stats.images} images in {stats.seconds:.1f} s "
        f"(loss {stats.loss_sum / max(1, stats.images):.3f})",
        flush=True,
    )
    return model


def make_model(args: Settings, workdir: Path, images: np.ndarray) -> Prepared:
    """Build, briefly train, export, check and write the repository under ``workdir``."""
    from serving.export.onnx import PARITY_ATOL, export_onnx, parity
    from training.model import ProbabilityHead, save_weights

    spec = model_spec(args)
    model = train_briefly(spec, args.dataset, args.data_dir, args.train_steps, 32)
    notes = []
    if args.train_steps <= 0:
        notes.append("--train-steps 0: initial weights (speed does not depend on weight values)")
    head = ProbabilityHead(model, spec.multi_label).eval()
    started = time.perf_counter()
    onnx_path = export_onnx(head, spec, workdir / "model.onnx", max_batch_size=max(BATCH_SIZES))
    diff = parity(head, onnx_path, images, (1, 7))
    if not diff <= PARITY_ATOL:
        raise BenchError(f"ONNX Runtime differs from PyTorch by {diff:.3g} (max abs)")
    print(f"exported ONNX in {time.perf_counter() - started:.0f} s (parity {diff:.1e})", flush=True)
    options = args.repository_options()
    models = write_model_set(workdir / "repository", spec, onnx_path, options)
    weights = workdir / "weights.pt"
    save_weights(model, weights, spec.to_json())
    notes.append(f"repository options: {options_summary(options)}")
    return Prepared(
        repository=workdir / "repository",
        classifier=classifier_name(spec),
        spec=spec,
        onnx_path=models.classifier / str(models.version) / onnx_path.name,
        weights=weights,
        notes=notes,
    )


def model_spec(args: Settings) -> ModelSpec:
    return ModelSpec.for_dataset(args.dataset, args.image_size, data_dir=args.data_dir)


def options_summary(options: RepositoryOptions) -> str:
    sizes = ",".join(map(str, options.preferred_batch_sizes)) or "none"
    return (
        f"max_queue_delay_us={options.max_queue_delay_us} preferred={sizes} "
        f"instances={options.instance_count} intra_op_threads={options.intra_op_threads} "
        f"max_batch_size={options.max_batch_size} "
        f"borrow_idle_cores={int(options.borrow_idle_cores)}"
    )


def config_summary(repository: Path, classifier: str) -> str:
    """:func:`options_summary` of a classifier's config.pbtxt as it is on disk (a reused
    ``--model-repository``; ``intra_op_threads=0``: cores / instances)."""
    return options_summary(options_from_config(read_config(repository / classifier)))


def find_classifier(repository: Path, model: str) -> tuple[str, ModelSpec, Path]:
    """(classifier name, spec, ONNX file of its latest version) in a CPU repository."""
    names = [
        n
        for n in list_models(repository)
        if read_config(repository / n).backend == "python"
        and "onnx_file" in read_config(repository / n).parameters
    ]
    if model:
        names = [n for n in names if n in (model, f"{model}_onnx")]
    if len(names) != 1:
        raise BenchError(
            f"{repository}: expected one ONNX classifier (python backend with onnx_file)"
            f"{' named ' + model if model else ''}, found {names or 'none'}; pass --model NAME"
        )
    config = read_config(repository / names[0])
    onnx_file = config.parameters["onnx_file"].string_value
    versions = sorted(
        (p for p in (repository / names[0]).iterdir() if p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    files = [v / onnx_file for v in versions if (v / onnx_file).is_file()]
    if not files:
        raise BenchError(f"{repository / names[0]}: no version holds {onnx_file}")
    return names[0], spec_from_config(config), files[-1]


def reuse_model(args: Settings, workdir: Path) -> Prepared:
    """The given repository; weights from ``--weights``, else initial ones saved here."""
    from training.model import build_model, load_weights, save_weights

    repository = Path(args.model_repository)
    if not repository.is_dir():
        raise BenchError(f"--model-repository {repository} is not a directory")
    name, spec, onnx_path = find_classifier(repository, args.model)
    notes = [f"repository {repository} as written (its own batching and instance settings)"]
    if args.weights:
        weights = Path(args.weights)
        if not weights.is_file():
            raise BenchError(f"--weights {weights} does not exist")
        state, _ = load_weights(weights)
        model = build_model(spec.channels, spec.num_classes)
        model.load_state_dict(state)  # fails loudly when the architecture differs
    else:
        import torch

        torch.manual_seed(0)
        model = build_model(spec.channels, spec.num_classes)
        weights = workdir / "weights.pt"
        save_weights(model, weights, spec.to_json())
        notes.append(
            "naive baseline: no --weights, so the same architecture with initial weights "
            "(speed does not depend on weight values)"
        )
    return Prepared(repository, name, spec, onnx_path, weights, notes)


def sample_images(spec, dataset: str, data_dir: str, count: int) -> np.ndarray:
    """``count`` real validation images, preprocessed (repeated if the split is smaller)."""
    from dataclasses import replace

    from serving.export.onnx import parity_images

    images = parity_images(replace(spec, dataset=dataset), data_dir, count)
    reps = -(-count // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:count], dtype=np.float32)


def prepare(args: Settings, workdir: Path) -> tuple[Prepared, np.ndarray]:
    """The model under test and real preprocessed images for the in-process runs."""
    check_data(args.dataset, args.data_dir)
    print("preparing the model", flush=True)
    count = max(args.batch_sizes)
    if args.model_repository:
        prepared = reuse_model(args, workdir)
        return prepared, sample_images(prepared.spec, args.dataset, args.data_dir, count)
    images = sample_images(model_spec(args), args.dataset, args.data_dir, count)
    return make_model(args, workdir, images), images
