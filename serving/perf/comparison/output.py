"""Where a benchmark run's results go: a folder of its own (``--out``; by default a new
``bench-results/<kind>-<date>-<time>`` under the current directory), and, only when asked
(``--record``), also the folder a script keeps its record in (``benchmarks/results/``).
Running a benchmark thus changes no tracked file unless one says so::

    python -c "from serving.perf.comparison.output import run_folder; print(run_folder('serving'))"
"""

from __future__ import annotations

import time
from pathlib import Path

from serving.repository.layout import check_writable, write_atomic

RUNS_DIR = "bench-results"  # relative: under the directory the benchmark runs in


def run_folder(kind: str) -> Path:
    """A new folder name for one run of benchmark ``kind``: ``bench-results/KIND-TIME``."""
    return Path(RUNS_DIR) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def destinations(out: str | Path, record: str | Path | None = None) -> list[Path]:
    """``[out]``, plus ``record`` when given: each created and checked writable now, before
    the run whose results would go there (:class:`~training.errors.ConfigError` naming it)."""
    folders = [(Path(out), "--out")]
    if record is not None:
        folders.append((Path(record), "--record into"))
    for folder, what in folders:
        check_writable(folder, f"{what} {folder}")
    return [folder for folder, _ in folders]


def write_text(folders: list[Path], name: str, text: str) -> list[Path]:
    """``text`` as the file ``name`` in every folder (atomically: never half a file)."""
    paths = [folder / name for folder in folders]
    for path in paths:
        write_atomic(path, text.encode())
    return paths
