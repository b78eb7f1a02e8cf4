"""Progress of ``medimg train`` and ``medimg tune`` as log records, and its one display.

Rank 0 of a Ray Train run logs a record every 25 steps and one per epoch on the
``training.progress`` logger; ``medimg tune``'s driver logs one whenever a trial starts,
reports or ends. The text is what a log file shows, the numbers ride in
``record.progress``. :class:`ProgressDisplay`, a logging handler, turns them into one
live (tqdm) bar on a terminal, elsewhere one plain line per epoch (per change of the
trials)::

    python -c "import logging, sys; from training import progress; \
logging.getLogger(progress.LOGGER).addHandler(progress.ProgressDisplay(sys.stderr, 'train')); \
logging.getLogger(progress.LOGGER).setLevel('INFO'); \
progress.epoch(1, 2, train_loss=0.4, val_auc=0.8, val_acc=0.7, images_per_s=50, seconds=12)"
"""

from __future__ import annotations

import logging
import shutil
from typing import Any, TextIO

LOGGER = "training.progress"
KINDS = {"train": ("step", "epoch"), "tune": ("trials",)}
log = logging.getLogger(LOGGER)


def _report(text: str, kind: str, **numbers: float | None) -> None:
    log.info("%s", text, extra={"progress": {"kind": kind, **numbers}})


def step(
    epoch: int, epochs: int, step: int, steps: int, loss: float, images_per_s: float, seconds: float
) -> None:
    """A training step of rank 0: ``seconds`` since its epoch started."""
    text = f"epoch {epoch}/{epochs} step {step}/{steps} loss {loss:.4f} {images_per_s:.0f} img/s"
    _report(
        text,
        "step",
        epoch=epoch,
        epochs=epochs,
        step=step,
        steps=steps,
        loss=loss,
        images_per_s=images_per_s,
        seconds=seconds,
    )


def epoch(
    epoch: int,
    epochs: int,
    *,
    train_loss: float,
    val_auc: float,
    val_acc: float,
    images_per_s: float,
    seconds: float,
) -> None:
    """An epoch of rank 0, validated: ``seconds`` it took, validation included."""
    text = (
        f"epoch {epoch}/{epochs} train_loss {train_loss:.4f} val_auc {val_auc:.4f} "
        f"val_acc {val_acc:.4f} ({seconds:.0f} s)"
    )
    _report(
        text,
        "epoch",
        epoch=epoch,
        epochs=epochs,
        loss=train_loss,
        val_auc=val_auc,
        val_acc=val_acc,
        images_per_s=images_per_s,
        seconds=seconds,
    )


def trials(done: int, running: int, total: int, best_val_auc: float | None) -> None:
    """The trials of a tuning job: ended, running, asked for, and the best val AUC so far."""
    best = "-" if best_val_auc is None else f"{best_val_auc:.4f}"
    text = f"trials {done}/{total} done, {running} running, best val AUC {best}"
    _report(text, "trials", done=done, running=running, total=total, best=best_val_auc)


def duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressDisplay(logging.Handler):
    """One display per run, fed by ``training.progress`` records of one ``kind``
    (``"train"``: steps and epochs; ``"tune"``: trials). ``live`` (default: ``stream`` is
    a terminal) draws a tqdm progress bar; otherwise one plain line per epoch, or per
    change of the trials. Other handlers print through :meth:`write` so that their lines
    land above the bar."""

    def __init__(self, stream: TextIO, kind: str, *, live: bool | None = None) -> None:
        super().__init__(logging.INFO)
        if kind not in KINDS:
            raise ValueError(
                f"progress display kind: expected one of {sorted(KINDS)}, got {kind!r}"
            )
        self.stream = stream
        self.kind = kind
        self.live = _is_terminal(stream) if live is None else live
        self._bar: Any = None  # a tqdm bar while live
        self._steps = 1
        self._epoch_seconds: float | None = None
        self._last_line = ""
        self._stopped = False

    def emit(self, record: logging.LogRecord) -> None:
        data = getattr(record, "progress", None)
        if not isinstance(data, dict) or data.get("kind") not in KINDS[self.kind]:
            return
        try:
            description, completed, total, stats, line = self._render(data)
            if self.live:
                if not self._stopped:
                    self._draw(description, completed, total, stats)
                if data["kind"] == "epoch" and data["epoch"] >= data["epochs"]:
                    self.stop()  # the run's last epoch: the bar stays as it is
            elif line and line != self._last_line:
                self._last_line = line
                self.write(line)
        except Exception:
            self.handleError(record)

    def _render(self, data: dict) -> tuple[str, float, float, str, str]:
        """(bar description, completed, total, stats text, plain line or "")."""
        if data["kind"] == "trials":
            best = "-" if data["best"] is None else f"{data['best']:.4f}"
            stats = f"{data['running']} running  best val AUC {best}"
            line = f"trials {data['done']}/{data['total']} done  {stats}"
            return (
                f"trials {data['done']}/{data['total']}",
                data["done"],
                data["total"],
                stats,
                line,
            )
        epochs, current = data["epochs"], data["epoch"]
        if data["kind"] == "step":
            self._steps = max(1, int(data["steps"]))
            done = (current - 1) * self._steps + data["step"]
            per_epoch = self._epoch_seconds or data["seconds"] / data["step"] * self._steps
            eta = per_epoch * ((self._steps - data["step"]) / self._steps + epochs - current)
            stats = (
                f"loss {data['loss']:.4f}  {data['images_per_s']:.0f} img/s  ETA {duration(eta)}"
            )
            return f"epoch {current}/{epochs}", done, epochs * self._steps, stats, ""
        self._epoch_seconds = data["seconds"]
        eta = data["seconds"] * (epochs - current)
        scores = f"loss {data['loss']:.4f}  val AUC {data['val_auc']:.4f}"
        speed = f"{data['images_per_s']:.0f} img/s"
        stats = f"{scores}  {speed}  {duration(data['seconds'])}/epoch  ETA {duration(eta)}"
        line = f"epoch {current}/{epochs}  {scores}  {speed}  {data['seconds']:.0f} s  ETA {duration(eta)}"
        return f"epoch {current}/{epochs}", current * self._steps, epochs * self._steps, stats, line

    def _draw(self, description: str, completed: float, total: float, stats: str) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                desc=description,
                total=total,
                initial=completed,
                postfix=stats,
                file=self.stream,
                bar_format="{desc} {bar} {percentage:3.0f}%{postfix}",  # postfix: ", stats"
                ncols=shutil.get_terminal_size((100, 24)).columns,  # a 0-wide pty draws nothing
            )
        self._bar.total = total
        self._bar.n = completed
        self._bar.set_description_str(description, refresh=False)
        self._bar.set_postfix_str(stats, refresh=False)
        self._bar.refresh()

    def write(self, text: str) -> None:
        """Print ``text`` (one or more lines) to the display's stream, above a live bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def stop(self) -> None:
        """End the live bar (drawn once more, as it stands); later records are ignored."""
        self._stopped = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.stop()
        super().close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
