"""Fixtures for the training/export/CLI tests: data, an isolated environment, a trained model.

Data: ``../shared/data`` when it holds ``pneumoniamnist.npz``; otherwise a tiny
file in the official MedMNIST layout is generated (a learnable bright blob marks
class 1), so the suite runs anywhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

__all__ = [
    "cli_env",
    "data_dir",
    "exported",
    "free_port",
    "isolated_env",
    "medimg_cmd",
    "mlflow_server",
    "scratch_of",
    "trained",
    "wait_for_output",
    "write_medmnist_npz",
]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAST_RAY = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def write_medmnist_npz(
    path: Path, counts: dict[str, int], *, seed: int = 0, n_classes: int = 2
) -> Path:
    """A MedMNIST-format .npz: uint8 (N, 28, 28) images, uint8 (N, 1) labels per split."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in counts.items():
        labels = (np.arange(n) % n_classes).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 120, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            if label:
                r, c = rng.integers(4, 16, size=2)
                images[i, r : r + 8, c : c + 8] = 230
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (SHARED_DATA / "pneumoniamnist.npz").exists():
        return SHARED_DATA
    path = tmp_path_factory.mktemp("data")
    write_medmnist_npz(path / "pneumoniamnist.npz", {"train": 256, "val": 64, "test": 64})
    return path


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory):
    """Ray's temp dir, MLflow's store and caches under a temporary folder, for the whole session."""
    root = tmp_path_factory.mktemp("env")
    values = {
        **FAST_RAY,
        "RAY_TMPDIR": str(root / "ray"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
        "XDG_CACHE_HOME": str(root / "cache"),
        "XDG_CONFIG_HOME": str(root / "config"),
        "MPLCONFIGDIR": str(root / "mpl"),
    }
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield root
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, isolated_env: Path):
    """A real MLflow tracking server (SQLite backend) on a free loopback port, stopped by PID."""
    import subprocess
    import time
    import urllib.request

    work = tmp_path_factory.mktemp("mlflow_server")
    from serving.server import find_free_port

    port = find_free_port()
    log = open(work / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{work / 'mlflow.db'}",
            "--artifacts-destination",
            str(work / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None, (work / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "mlflow server not healthy after 120 s"
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, 15)  # its own session: the server and its workers, by the PID we hold
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    log.close()


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, mlflow_server: str):
    """One real Ray Train run: 2 workers, 1 epoch, 256 images at 32 px, tracked in MLflow
    through a real tracking server over HTTP (rank 0 logs per-epoch metrics there too).
    The driver's temporary files go to :func:`scratch_of` ``(cfg.storage_path)``, which
    a test checks is left empty."""
    import tempfile

    import ray

    from training.config import TrainConfig
    from training.run import train_and_register

    work = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(
        dataset="pneumoniamnist",
        epochs=1,
        image_size=32,
        batch_size=32,
        workers=2,
        max_train_samples=256,
        data_dir=str(data_dir),
        tracking_uri=mlflow_server,
        storage_path=str(work / "ray_results"),
    )
    saved, tempfile.tempdir = tempfile.tempdir, str(scratch_of(cfg.storage_path))
    try:
        outcome = train_and_register(cfg)
    finally:
        tempfile.tempdir = saved
        ray.shutdown()
    return cfg, outcome


def scratch_of(path: str | Path) -> Path:
    """The temporary-file directory a fixture gave the code that wrote ``path`` (beside it)."""
    scratch = Path(path).parent / "scratch"
    scratch.mkdir(exist_ok=True)
    return scratch


@pytest.fixture
def free_port():
    from serving.server import find_free_port

    return find_free_port


def wait_for_output(log: Path, text: str, proc, timeout: float) -> str:
    """Poll ``log`` until it holds ``text``; fail with its tail if ``proc`` exits or time runs out."""
    import time

    deadline = time.monotonic() + timeout
    while text not in (content := log.read_text()):
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{content[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{content[-4000:]}"
        time.sleep(0.3)
    return content


@pytest.fixture(scope="session")
def medimg_cmd() -> list[str]:
    """The console script of this environment, by absolute path (no activation needed)."""
    script = Path(sys.executable).parent / "medimg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "serving.cli"]


@pytest.fixture
def cli_env(tmp_path: Path, data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MEDIMG_DATA_DIR"] = str(data_dir)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    return env


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory: pytest.TempPathFactory, medimg_cmd):
    """``medimg export --run-id`` of the trained run, and the model loaded back from MLflow;
    both write their temporary files to :func:`scratch_of` ``(repository)``."""
    import subprocess
    import tempfile

    from serving.export import ExportReport
    from serving.repository import ModelSet
    from training.registry import load_model

    cfg, outcome = trained
    repository = tmp_path_factory.mktemp("model_repository") / "repository"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": cfg.tracking_uri,
        "MEDIMG_DATA_DIR": cfg.data_dir,
        "TMPDIR": str(scratch_of(repository)),
    }
    args = [*medimg_cmd, "export", "--run-id", outcome.run_id, "--repository", str(repository)]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    diff = float(result.stdout.split("parity max abs diff ")[1].split()[0])
    batches = tuple(
        int(b) for b in result.stdout.split("at batch sizes [")[1].split("]")[0].split(",")
    )
    name = outcome.model_name
    models = ModelSet(
        ensemble=repository / name,
        classifier=repository / f"{name}_onnx",
        preprocess=repository / f"{name}_preprocess",
        version=1,
    )
    report = ExportReport(
        onnx_path=models.classifier / "1" / "model.onnx",
        models=models,
        max_abs_diff=diff,
        parity_batches=batches,
    )
    saved, tempfile.tempdir = tempfile.tempdir, str(scratch_of(repository))
    try:
        loaded = load_model(cfg.tracking_uri, f"runs:/{outcome.run_id}/model")
    finally:
        tempfile.tempdir = saved
    return loaded, repository, report
