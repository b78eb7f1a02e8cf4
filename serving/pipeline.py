"""``medimg pipeline``: train -> register -> export -> serve -> evaluate through Triton.

The whole test split goes through the running server's ensemble over gRPC, as PNG
bytes the server decodes and preprocesses; the AUC/ACC measured there must agree with
the in-process values to 1e-3 and every served (calibrated) probability with the
in-process calibrated one to 1e-4, else the command fails::

    medimg pipeline --dataset pneumoniamnist --data-dir ../shared/data
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serving.clients import inputs
from serving.clients.sync import TritonClassifier
from serving.export.onnx import export_model
from serving.server.process import TritonServer, serve_foreground
from training.config import TrainConfig
from training.data import DataOptions, medmnist_arrays, open_split
from training.driver import TrainOutcome, train_and_register
from training.errors import ServingError
from training.metrics import evaluate
from training.registry import load_model

if TYPE_CHECKING:
    from training.console import RunConsole

AGREEMENT = 1e-3  # AUC / ACC through Triton against in process
PROBABILITY_AGREEMENT = 1e-4  # each served (calibrated) probability against in process
CARD_DIR = "model_card"  # the pipeline's model cards: model_card/<name>-v<version>/


@dataclass
class ServedEvaluation:
    auc: float
    acc: float
    max_abs_diff: float
    images: int
    seconds: float
    acc_at_threshold: float | None = None  # binary: the served label's accuracy


def accuracy_at_threshold(spec, labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary models: the accuracy of the label the operating threshold gives (the served
    label, ``ModelContract.prediction``); None without a threshold or for other tasks."""
    if spec.operating_threshold is None:
        return None
    return float(np.mean(spec.predicted(probs) == np.asarray(labels).reshape(-1)))


def evaluate_served(
    server: TritonServer, outcome: TrainOutcome, cfg: TrainConfig
) -> ServedEvaluation:
    """Send the whole test split through ``server`` over gRPC, as a client would -- the
    files' own bytes, or a MedMNIST split's images PNG-encoded at the file's resolution
    (not the network's: the server reduces larger inputs as the data set was made) -- and
    score it."""
    spec = outcome.spec
    opts = DataOptions.from_config(cfg)
    test = open_split(opts, "test", image_size=spec.image_size, channels=spec.channels)
    if test.paths is not None:
        images = [Path(path).read_bytes() for path in test.paths]
    else:
        raw, _ = medmnist_arrays(opts.dataset, "test", opts.data_dir, opts.size)
        images = [inputs.png_bytes(image) for image in raw]
    started = time.perf_counter()
    with TritonClassifier(server.grpc_url, "grpc", spec.model_name) as client:
        probs = client.infer_bytes(images)
    seconds = time.perf_counter() - started
    scores = evaluate(spec.task, test.labels, probs)
    diff = float(np.max(np.abs(probs - outcome.test_probs)))
    at = accuracy_at_threshold(spec, test.labels, probs)
    return ServedEvaluation(scores["auc"], scores["acc"], diff, len(test), seconds, at)


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (C, H, W) image, as a split holds it, as PNG (lossless)."""
    return inputs.png_bytes(np.asarray(image).transpose(1, 2, 0))


def check_agreement(outcome: TrainOutcome, served: ServedEvaluation) -> None:
    if not served.max_abs_diff <= PROBABILITY_AGREEMENT:
        raise ServingError(
            f"served probabilities differ from the in-process calibrated ones by up to "
            f"{served.max_abs_diff:.3g} (allowed {PROBABILITY_AGREEMENT}); temperature "
            f"{outcome.spec.temperature or 'none'}"
        )
    for name in ("auc", "acc"):
        here, there = outcome.test[name], getattr(served, name)
        if not abs(here - there) <= AGREEMENT:
            raise ServingError(
                f"test {name.upper()} through Triton {there:.6f} differs from in-process "
                f"{here:.6f} by more than {AGREEMENT}"
            )


def report(outcome: TrainOutcome, served: ServedEvaluation) -> None:
    """AUC and ACC (arg-max) both ways, and the served label's ACC at the operating
    threshold (binary models)."""
    here = accuracy_at_threshold(outcome.spec, outcome.test_labels, outcome.test_probs)
    t = outcome.spec.operating_threshold

    def at(value: float | None) -> str:
        return "" if value is None or t is None else f"  ACC at threshold {t:.3f}: {value:.4f}"

    print(
        f"test split ({served.images} images) in-process:   "
        f"AUC {outcome.test['auc']:.4f}  ACC {outcome.test['acc']:.4f}{at(here)}"
    )
    print(
        f"test split ({served.images} images) through Triton: AUC {served.auc:.4f}  ACC {served.acc:.4f}"
        f"{at(served.acc_at_threshold)}  (gRPC, {served.images / served.seconds:.0f} img/s, "
        f"max |dp| {served.max_abs_diff:.2e})",
        flush=True,
    )


def write_model_card(cfg: TrainConfig, outcome: TrainOutcome, examples: int = 2) -> Path:
    """``model_card/<name>-v<version>/model_card.md`` (+ html, json, CAM examples), also
    attached to the version in MLflow; returns the Markdown file."""
    from serving.explain.card import card_examples
    from training.card import gather_card
    from training.card_render import attach_card, write_card

    ref = f"{outcome.model_name}/{outcome.version}"
    out = Path(CARD_DIR) / f"{outcome.model_name}-v{outcome.version}"
    card = gather_card(cfg.tracking_uri, ref, cfg.data_dir)
    params = {"data_dir": cfg.data_dir, "size": cfg.size, "val_fraction": cfg.val_fraction}
    params["test_fraction"] = cfg.test_fraction
    shown = card_examples(
        cfg.tracking_uri,
        outcome.model_name,
        outcome.version,
        out,
        count=examples,
        data_dir=cfg.data_dir,
        params=params,
    )
    paths = write_card(card, out, shown)
    attach_card(cfg.tracking_uri, card, out)
    return paths[0]


def calibration_line(calibration: dict) -> str:
    """One line: the temperature and test ECE / Brier / NLL before -> after."""
    before, after = calibration["before"], calibration["after"]
    parts = [
        f"{name} {before[key]['value']:.4f} -> {after[key]['value']:.4f}"
        for key, name in (("ece", "ECE"), ("brier", "Brier"), ("nll", "NLL"))
        if before.get(key, {}).get("value") is not None
        and after.get(key, {}).get("value") is not None
    ]
    temperature = ", ".join(f"{t:.3f}" for t in calibration["temperature"])
    return f"calibrated on val (temperature {temperature}): test " + ", ".join(parts)


def log_to_mlflow(outcome: TrainOutcome, served: ServedEvaluation, tracking_uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in {
        "triton_test_auc": served.auc,
        "triton_test_acc": served.acc,
        **(
            {"triton_test_acc_at_threshold": served.acc_at_threshold}
            if served.acc_at_threshold is not None
            else {}
        ),
        "triton_max_abs_diff": served.max_abs_diff,
        "triton_images_per_s": served.images / served.seconds,
    }.items():
        client.log_metric(outcome.run_id, key, value)


def run_pipeline(
    cfg: TrainConfig,
    server: TritonServer,
    *,
    keep_serving: bool = False,
    console: RunConsole | None = None,
) -> int:
    """Train, export, serve and evaluate; with a ``console``, what the libraries print while
    training and exporting goes to the run's log file."""
    quiet = console.quiet if console is not None else contextlib.nullcontext
    started = time.perf_counter()
    with quiet():
        outcome = train_and_register(cfg)
    print(
        f"trained {outcome.model_name} version {outcome.version} (MLflow run {outcome.run_id}) "
        f"in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    if outcome.calibration:
        print(calibration_line(outcome.calibration), flush=True)
    with quiet():
        exported = export_model(
            load_model(cfg.tracking_uri, outcome.model_uri),
            Path(server.repository),
            data_dir=cfg.data_dir,
        )
    print(
        f"exported to {exported.model_dir} version {exported.version} "
        f"(ONNX parity max abs diff {exported.max_abs_diff:.2e})",
        flush=True,
    )
    with quiet():
        card = write_model_card(cfg, outcome)
    print(f"model card: {card}", flush=True)

    def on_ready(running: TritonServer) -> None:
        served = evaluate_served(running, outcome, cfg)
        report(outcome, served)
        log_to_mlflow(outcome, served, cfg.tracking_uri)
        check_agreement(outcome, served)
        print(f"pipeline finished in {time.perf_counter() - started:.0f} s", flush=True)
        if keep_serving:
            print(
                f"serving {outcome.model_name}: HTTP {running.http_url}  gRPC {running.grpc_url}  "
                f"metrics {running.metrics_url}; Ctrl-C stops",
                flush=True,
            )

    if keep_serving:
        return serve_foreground(server, on_ready=on_ready)
    with server:
        on_ready(server)
    return 0
