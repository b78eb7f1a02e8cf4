"""The package as users and the Triton image install it: a wheel, installed without ``-e``
into a fresh virtual environment, holds every subpackage and the backend's files::

    python -m pytest tests/integration/test_wheel_install.py -q

The dependencies are not installed a second time (7 GB): the fresh environment sees the
test environment's site-packages through a ``.pth`` line, which adds that folder to
the module search path without running its ``.pth`` files, so the editable install of this
checkout stays out of sight and only the wheel provides ``serving`` and ``training``.
"""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import serving
import training

ROOT = Path(__file__).resolve().parents[2]
NOT_SOURCE = (".git", ".venv", "build", "*.egg-info", "__pycache__", "mlruns", "model_repository")
BACKEND_IMPORTS = ("training.errors", "training.images", "training.spec", "training.transforms")


def _modules(package) -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}."))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel of this checkout installed (``--no-deps``)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # setuptools writes build/ into the tree it builds: not ours
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = (tmp / "dist").glob("medimg-*.whl")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "medimg-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return env_dir


def _run(env_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_installed_wheel_runs_medimg_help(installed: Path, tmp_path: Path) -> None:
    result = _run(installed, str(installed / "bin" / "medimg"), "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in (
        "train",
        "tune",
        "pipeline",
        "export",
        "build-engine",
        "publish",
        "serve",
        "classify",
        "label",
        "triage",
        "bench",
        "tune-server",
    ):
        assert command in result.stdout


def test_the_installed_wheel_holds_every_module(installed: Path, tmp_path: Path) -> None:
    """Every module of this checkout imports from the wheel (not from the checkout), the
    Triton backend's files are package data, and the modules the backend imports load."""
    expected = [m for m in _modules(serving) + _modules(training) if ".triton_backend." not in m]
    code = (
        "import importlib, importlib.resources, sys\n"
        f"names = {expected!r}\n"
        "for name in names:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert not module.__file__.startswith({str(ROOT)!r}), module.__file__\n"
        "files = importlib.resources.files('serving.triton_backend')\n"
        "print(sorted(p.name for p in files.iterdir() if p.name.endswith('.py')))\n"
        f"for name in {BACKEND_IMPORTS!r}:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    result = _run(installed, str(installed / "bin" / "python"), "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    backend_files, count = result.stdout.split("\n")[:2]
    assert backend_files == "['__init__.py', 'model.py', 'preprocess.py']"
    assert int(count) == len(expected) > 40
