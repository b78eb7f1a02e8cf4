"""The console of ``medimg train``, ``tune`` and ``pipeline``: one progress display, medimg's
own messages and the results. Everything else goes to ``medimg.log`` in the run directory
(its path printed once): Ray's worker and controller lines, library log records (Ray,
MLflow, Python warnings) and what libraries print while :meth:`RunConsole.quiet` is on.
Library errors still reach the console; with ``-v`` everything does::

    medimg train --epochs 1 --max-train-samples 256     # progress, messages, results
    medimg -v train --epochs 1 --max-train-samples 256  # and every library line
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from training.progress import LOGGER as PROGRESS
from training.progress import ProgressDisplay
from training.worker_logs import WORKER_OUTPUT

LOG_FILE = "medimg.log"
RUN_DIR = "medimg_run_dir"  # the record attribute that announces a run directory
OURS = ("training", "serving")
LIBRARIES = ("ray", "mlflow", "alembic", "sqlalchemy", "huey")  # print on their own handlers
QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # no \r bars in the log file
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s%(origin)s: %(message)s"
PLAIN = (WORKER_OUTPUT, "py.stdout", "py.stderr")  # shown on a console without level/name
HELD_MAX = 10000  # records kept in memory until the run directory is known


def _unset(key: str) -> None:
    os.environ.pop(key, None)


def announce_run_dir(logger: logging.Logger, directory: str) -> None:
    """Say where the run keeps its files; a :class:`RunConsole` opens its log file there."""
    logger.info("run directory %s", directory, extra={RUN_DIR: directory})


def log_path(directory: str) -> Path:
    """``<directory>/medimg.log``; for remote storage (``s3://...``) a local file named
    after the run, under the temp dir."""
    if "://" in directory:
        name = directory.rstrip("/").rsplit("/", 1)[-1]
        return Path(tempfile.gettempdir()) / "medimg" / name / LOG_FILE
    return Path(directory) / LOG_FILE


class _ConsoleFilter(logging.Filter):
    """What reaches the console: medimg's records (a worker's INFO from rank 0 of a
    train run only), any library error; everything with ``verbose``. Never progress
    records (the display shows them) nor the run-directory announcement."""

    def __init__(self, verbose: bool, worker_info: bool) -> None:
        super().__init__()
        self.verbose, self.worker_info = verbose, worker_info

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(getattr(record, "progress", None), dict) or hasattr(record, RUN_DIR):
            return False
        if self.verbose or record.levelno >= logging.ERROR:
            return True
        if record.name.split(".")[0] not in OURS:
            return False
        worker = getattr(record, "worker", None)
        if isinstance(worker, dict) and record.levelno < logging.WARNING:
            return self.worker_info and worker.get("rank") == 0
        return True


class _ToDisplay(logging.Handler):
    def __init__(self, display: ProgressDisplay) -> None:
        super().__init__()
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.display.write(self.format(record))
        except Exception:
            self.handleError(record)


class _ConsoleFormatter(logging.Formatter):
    """``LEVEL logger: message``; lines of Ray workers and of prints as they were."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name in PLAIN:
            return record.getMessage()
        return super().format(record)


class _FileFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        worker = getattr(record, "worker", None)
        record.origin = (
            f" [worker rank {worker.get('rank')} pid {worker.get('pid')}]"
            if isinstance(worker, dict)
            else ""
        )
        return super().format(record)


class _RunLog(logging.Handler):
    """Every record into ``<run dir>/medimg.log``, held in memory until a record
    announces the run directory (:func:`announce_run_dir`); appends on ``--resume``."""

    def __init__(self, on_open: Callable[[Path], None]) -> None:
        super().__init__(logging.DEBUG)
        self.on_open = on_open
        self.file: logging.FileHandler | None = None
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        directory = getattr(record, RUN_DIR, None)
        if directory and self.file is None:
            path = log_path(str(directory))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = logging.FileHandler(path, encoding="utf-8")
            self.file.setFormatter(self.formatter)
            for held in self.held:
                self.file.emit(held)
            self.held = []
            self.on_open(path)
        if self.file is not None:
            self.file.emit(record)
        elif len(self.held) < HELD_MAX:
            self.held.append(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


class _LineLogger(io.TextIOBase):
    """A text stream whose complete lines (``\\n`` or ``\\r`` ended) become INFO records
    of ``name``; ``fileno()`` is the original stream's, for code that needs a real one."""

    def __init__(self, name: str, original: TextIO) -> None:
        super().__init__()
        self.logger = logging.getLogger(name)
        self.original = original
        self._pending = ""
        self._lock = threading.RLock()
        self._inside = threading.local()  # a record that fails to print prints to us again

    def write(self, text: str) -> int:
        if getattr(self._inside, "on", False):
            return self.original.write(text)
        with self._lock:
            *lines, self._pending = re.split(r"[\r\n]", self._pending + text)
        self._log(lines)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            lines, self._pending = [self._pending], ""
        self._log(lines)

    def _log(self, lines: list[str]) -> None:
        self._inside.on = True
        try:
            for line in lines:
                if line.strip():
                    self.logger.info("%s", line.rstrip())
        finally:
            self._inside.on = False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.original.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.original, "encoding", None) or "utf-8"


class RunConsole:
    """The console of one command (``kind``: ``"train"`` or ``"tune"``, the progress it
    shows). Inside ``with``: logging goes to the console (filtered) and to the run's log
    file; Ray workers' lines go there too; :meth:`quiet` also catches what libraries print.
    Everything is put back on exit."""

    def __init__(
        self,
        kind: str,
        *,
        verbose: bool = False,
        stream: TextIO | None = None,
        live: bool | None = None,
    ) -> None:
        self.kind, self.verbose, self.stream, self.live = kind, verbose, stream, live
        self.log_path: Path | None = None
        self._undo: list[Callable[[], None]] = []
        self._adopted: set[str] = set()

    def __enter__(self) -> RunConsole:
        self.display = ProgressDisplay(self.stream or sys.stderr, self.kind, live=self.live)
        self.filter = _ConsoleFilter(self.verbose, worker_info=self.kind == "train")
        self.console = _ToDisplay(self.display)
        self.console.setFormatter(_ConsoleFormatter(CONSOLE_FORMAT))
        self.console.addFilter(self.filter)
        self.file = _RunLog(self._opened)
        self.file.setFormatter(_FileFormatter(FILE_FORMAT))
        handlers = [self.console, self.file]
        self._take(logging.getLogger(), handlers, level=logging.INFO)
        self._take(logging.getLogger(WORKER_OUTPUT), handlers, propagate=False)
        self._take(logging.getLogger(PROGRESS), [self.display], propagate=True)
        for name in OURS:  # INFO (-v: DEBUG) whatever the caller set
            self._take(
                logging.getLogger(name), logging.getLogger(name).handlers, level=logging.INFO
            )
        logging.captureWarnings(True)
        self._undo.append(lambda: logging.captureWarnings(False))
        for key, value in QUIET_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                self._undo.append(functools.partial(_unset, key))
        self._adopt_libraries(load=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.display.stop()
        if self.file.file is None:  # no run directory: what the console hid must not vanish
            for record in self.file.held:
                if record.levelno >= logging.WARNING and not self.filter.filter(record):
                    self.display.write(self.console.format(record))
        for undo in reversed(self._undo):
            undo()
        self.file.close()

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """What libraries print to ``sys.stdout``/``sys.stderr`` meanwhile becomes log records
        (``py.stdout``/``py.stderr``): the log file, and the console with ``-v``."""
        self._adopt_libraries()
        saved = sys.stdout, sys.stderr
        out, err = _LineLogger("py.stdout", saved[0]), _LineLogger("py.stderr", saved[1])
        sys.stdout, sys.stderr = out, err
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved
            out.flush()
            err.flush()

    def _opened(self, path: Path) -> None:
        self.log_path = path
        self.display.write(f"log file: {path}")

    def _take(
        self,
        logger: logging.Logger,
        handlers: list,
        *,
        level: int | None = None,
        propagate: bool | None = None,
    ) -> None:
        saved = (logger.handlers[:], logger.level, logger.propagate)

        def undo() -> None:
            logger.handlers, logger.propagate = saved[0], saved[2]
            logger.setLevel(saved[1])

        self._undo.append(undo)
        logger.handlers = list(handlers)
        if level is not None:
            logger.setLevel(logging.DEBUG if self.verbose and logger.name in OURS else level)
        if propagate is not None:
            logger.propagate = propagate

    def _adopt_libraries(self, load: bool = False) -> None:
        """Libraries that print through their own handlers (Ray, MLflow) log through ours
        instead. ``load`` imports Ray and MLflow first: they configure those at import."""
        if load:
            for module in ("ray", "mlflow"):
                with contextlib.suppress(ImportError):
                    __import__(module)
        for name in list(logging.Logger.manager.loggerDict):
            logger = logging.getLogger(name)
            if (
                name.split(".")[0] in LIBRARIES
                and name not in self._adopted
                and (logger.handlers or not logger.propagate)
            ):
                self._adopted.add(name)
                self._take(logger, [], propagate=True)
