"""What a tritonserver leaves in ``/dev/shm``: the names each server gets there, and their removal.

Each :class:`~serving.server.process.TritonServer` gets a private prefix for the Python
backend's shared-memory regions (:func:`new_shm_prefix`) and a core-lock file for its
classifier instances (:func:`core_lock_path`, read by ``serving/triton_backend/model.py``).
A clean exit removes the regions; SIGKILL or a crash does not, and each holds 1 MiB or more
of RAM until reboot: :func:`remove_shm_regions` and :func:`remove_stale_core_locks` do::

    python -c "from serving.server.cleanup import remove_stale_core_locks; \
print(remove_stale_core_locks())"
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from training.errors import ConfigError

SHM_ROOT = Path("/dev/shm")  # where POSIX shm_open() regions live on Linux
SHM_PREFIX = "medimg"  # + launcher pid + "-" + hex + "_": new_shm_prefix()
CORE_LOCK_PREFIX = "medimg-cores-medimg"  # + launcher pid + "-" + hex: core_lock_path()


def new_shm_prefix() -> str:
    """A shared-memory prefix private to one server: two servers on one machine must not
    share regions. It names this (launching) process, for :func:`remove_stale_core_locks`."""
    return f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}_"


def core_lock_path(shm_prefix: str, root: Path = SHM_ROOT) -> Path:
    """The lock the classifier instances of the server with ``shm_prefix`` share for
    borrowing idle cores (``triton_backend/model.py``); removed when the server stops."""
    name = shm_prefix.removeprefix(SHM_PREFIX).rstrip("_")  # <pid>-<hex>
    return root / f"{CORE_LOCK_PREFIX}{name}"


def remove_shm_regions(prefix: str, root: Path = SHM_ROOT) -> list[str]:
    """Remove the Python backend's shared-memory regions named ``prefix*`` that a stopped
    server left behind (a clean exit removes them; SIGKILL or a crash does not, and each
    holds 1 MiB or more of RAM until reboot). Only for a prefix unique to one stopped
    server: :func:`new_shm_prefix` makes one per server. Returns the names removed."""
    if not prefix or "/" in prefix:
        raise ConfigError(f"shared-memory prefix must be a plain file-name prefix, got {prefix!r}")
    return _unlink_where(root, lambda name: name.startswith(prefix))


def remove_stale_core_locks(root: Path = SHM_ROOT) -> list[str]:
    """Remove the core-lock files (triton_backend/model.py) of servers whose launching process
    is gone without calling stop() (it died, or ``os._exit``): empty files, but one per such
    server until reboot. A live launcher's locks stay. Returns the names removed."""

    def stale(name: str) -> bool:
        pid = name.removeprefix(CORE_LOCK_PREFIX).split("-")[0]
        return name.startswith(CORE_LOCK_PREFIX) and pid.isdigit() and not _alive(int(pid))

    return _unlink_where(root, stale)


def _unlink_where(root: Path, matches: Callable[[str], bool]) -> list[str]:
    """Remove the files in ``root`` whose name ``matches``; returns the names removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in root.iterdir():
            if matches(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
