"""The tritonserver "home": the nvidia-pytriton wheel's server tree, and the environment to run it.

:func:`prepare_server_home` copies the wheel's server tree once into a cache
(``$MEDIMG_CACHE_DIR``, else ``$XDG_CACHE_HOME/medimg``, else ``~/.cache/medimg``)
together with the Python-backend stub for the running Python; :func:`server_env`
is the environment that lets Python-backend models import this environment's
packages whether or not the venv is activated::

    python -c "from serving.server.home import prepare_server_home, server_env; \
print(prepare_server_home()); print(server_env()['LD_LIBRARY_PATH'])"
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from training.errors import ServingError


def cache_dir() -> Path:
    """Where medimg keeps the prepared server (created on demand)."""
    if os.environ.get("MEDIMG_CACHE_DIR"):
        return Path(os.environ["MEDIMG_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "medimg"
    return Path.home() / ".cache" / "medimg"


def wheel_paths() -> tuple[Path, Path]:
    """``(pytriton/tritonserver, nvidia_pytriton.libs)`` inside the installed wheel."""
    found = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        raise ServingError("nvidia-pytriton is not installed: pip install nvidia-pytriton")
    package = Path(next(iter(found.submodule_search_locations)))
    dist, libs = package / "tritonserver", package.parent / "nvidia_pytriton.libs"
    if not (dist / "bin" / "tritonserver").is_file() or not libs.is_dir():
        raise ServingError(f"no tritonserver binary or libraries in {package.parent}")
    return dist, libs


def _home_complete(home: Path) -> bool:
    stub = home / "backends" / "python" / "triton_python_backend_stub"
    return os.access(home / "bin" / "tritonserver", os.X_OK) and os.access(stub, os.X_OK)


def prepare_server_home(cache: Path | None = None) -> Path:
    """Copy the wheel's server tree plus this Python's backend stub into the cache, once.

    Built in a temporary directory beside its final place and renamed into it, so
    concurrent or interrupted runs never see half a copy.
    """
    dist, _ = wheel_paths()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (dist / "python_backend_stubs").iterdir() if p.is_dir())
        raise ServingError(f"nvidia-pytriton has no backend stub for Python {python}; has {have}")
    cache = Path(cache) if cache is not None else cache_dir()
    home = cache / f"tritonserver-{importlib.metadata.version('nvidia-pytriton')}-py{python}"
    if _home_complete(home):
        return home
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{home.name}.new-"))
    try:
        tree = staging / "t"
        ignore = shutil.ignore_patterns("python_backend_stubs", "__pycache__")
        shutil.copytree(dist, tree, ignore=ignore)
        shutil.copy2(stub, tree / "backends" / "python" / "triton_python_backend_stub")
        if _home_complete(home):  # another process finished first: use its copy
            return home
        if home.exists():  # broken leftover (files deleted by hand): move it aside
            os.replace(home, staging / "broken")
        try:
            os.replace(tree, home)
        except OSError:
            if not _home_complete(home):  # anything but losing a race to a complete copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return home


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and its Python-backend stubs.

    The stub embeds Python in *isolated* mode: it ignores ``PYTHONPATH`` and
    ``PYTHONHOME`` and finds ``sys.prefix`` by looking ``python3`` up on ``PATH``
    (a venv's ``bin/python3`` beside ``pyvenv.cfg`` gives the venv's site-packages).
    So ``PATH`` starts with this environment's ``bin``; ``LD_LIBRARY_PATH`` holds the
    wheel's libraries and this Python's LIBDIR (else the stub loads a system
    libpython of the same minor version, or none); ``PYTHONPATH`` lists this
    environment's site-packages for any stub that does read the environment.
    """
    env = dict(os.environ if base is None else base)
    _, libs = wheel_paths()

    def joined(first: list[str], existing: str | None) -> str:
        parts = [*first, *(existing.split(os.pathsep) if existing else [])]
        return os.pathsep.join(dict.fromkeys(p for p in parts if p))

    bindir = Path(sys.prefix) / "bin"
    if not (bindir / "python3").exists():
        bindir = Path(sys.executable).parent
    env["PATH"] = joined([str(bindir)], env.get("PATH") or os.defpath)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = joined([str(libs), libdir], env.get("LD_LIBRARY_PATH"))
    paths = sysconfig.get_paths()
    env["PYTHONPATH"] = joined([paths["purelib"], paths["platlib"]], env.get("PYTHONPATH"))
    for name in ("PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env
