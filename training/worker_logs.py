"""Ray workers' output in the driver: medimg's own log records, and everything else.

A Ray worker's stdout and stderr reach the driver line by line (``log_to_driver``),
where Ray prints them. Two things change that, both installed by ``training.ray_trainer``:

- in each Train worker, :func:`relay_to_driver` writes the ``training.*`` log records as
  one marked JSON line each; in the driver, :func:`route_ray_output` turns those lines
  back into log records of the same logger (with ``record.worker``: rank, pid, node), so
  the driver's logging decides where they go (console, log file, progress display);
- every other line (Ray's own: ``Reporting training result ...``, the controller's
  resource requests, core worker errors) goes to the :data:`WORKER_OUTPUT` logger when a
  handler listens there (``training.console.RunConsole``), else Ray prints it as before::

    python -c "from training.worker_logs import decode; \
print(decode('medimg-log {\\"name\\": \\"training.x\\", \\"level\\": 20, \\"msg\\": \\"hi\\"}'))"
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

MARK = "medimg-log "
RELAYED = ("training", "serving")  # loggers whose records cross over as records
WORKER_OUTPUT = "medimg.worker_output"  # every other line of a Ray worker or actor
RAY_HANDLER = "ray_print_logs"  # the name ray.init gives its printing handler
log = logging.getLogger(__name__)


class _Relay(logging.Handler):
    """Worker side: one ``MARK`` + JSON line on stderr per record."""

    def __init__(self, rank: int) -> None:
        super().__init__(logging.DEBUG)
        self.rank = rank

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            payload = {
                "name": record.name,
                "level": record.levelno,
                "msg": text,
                "rank": self.rank,
                "pid": os.getpid(),
            }
            if isinstance(getattr(record, "progress", None), dict):
                payload["progress"] = record.progress  # type: ignore[attr-defined]
            sys.stderr.write(MARK + json.dumps(payload) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def relay_to_driver(rank: int) -> None:
    """In a Ray Train worker: ``training.*`` records at INFO and above go to the driver
    as records (not through Ray's console handler, which would print them as plain text)."""
    logger = logging.getLogger("training")
    if not any(isinstance(h, _Relay) for h in logger.handlers):
        logger.addHandler(_Relay(rank))
    logger.setLevel(logging.INFO)
    logger.propagate = False


def decode(text: str, node: str | None = None) -> logging.LogRecord | None:
    """The record a relayed line carries (from a worker on ``node``), or None for any
    other line."""
    at = text.find(MARK)
    if at < 0:
        return None
    try:
        payload = json.loads(text[at + len(MARK) :])
        name, level, msg = str(payload["name"]), int(payload["level"]), str(payload["msg"])
    except (ValueError, KeyError, TypeError):
        return None
    if name.split(".")[0] not in RELAYED:
        return None
    worker = {"rank": payload.get("rank"), "pid": payload.get("pid"), "node": node}
    extra: dict[str, Any] = {"worker": worker}
    if isinstance(payload.get("progress"), dict):
        extra["progress"] = payload["progress"]
    record = logging.getLogger(name).makeRecord(name, level, "(worker)", 0, msg, (), None)
    record.__dict__.update(extra)
    return record


def _source(data: dict) -> str:
    """Ray's prefix for a batch of lines: ``(RayTrainWorker pid=123, ip=10.0.0.2)``."""
    parts = [data.get("actor_name") or data.get("task_name") or "", f"pid={data.get('pid')}"]
    ip = data.get("ip")
    where = f", ip={ip}" if ip and ip != data.get("localhost") else ""
    return f"({' '.join(p for p in parts if p)}{where})"


def _shown(data: dict, lines: list[str]) -> list[str]:
    """Of the autoscaler's status reports, only its events, as Ray prints them."""
    if data.get("pid") != "autoscaler":
        return lines
    try:
        from ray._private.worker import filter_autoscaler_events
    except ImportError:
        return []
    return list(filter_autoscaler_events(lines))


def _router(original):
    def route(data: dict) -> None:
        rest = []
        for line in data.get("lines") or []:
            record = decode(line, data.get("ip"))
            if record is None:
                rest.append(line)
            elif logging.getLogger(record.name).isEnabledFor(record.levelno):
                logging.getLogger(record.name).handle(record)
        sink = logging.getLogger(WORKER_OUTPUT)
        if rest and not sink.handlers:  # nobody listens: Ray prints them, as without medimg
            original({**data, "lines": rest})
            return
        source = _source(data)  # all INFO: a worker's stderr holds every level of Ray's logs
        for line in _shown(data, rest):
            sink.info("%s %s", source, line)

    route.medimg_router = True
    return route


def route_ray_output() -> bool:
    """In the driver, after ``ray.init(log_to_driver=True)``: put the router in front of
    Ray's printing handler. False when this Ray has no such handler (Ray Client, or
    another Ray version): its output is then printed by Ray, unrouted."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    handlers = dict(getattr(dispatcher, "handlers", []))
    original = handlers.get(RAY_HANDLER)
    if original is None:
        log.debug(
            "no %r handler in Ray's stdstream dispatcher: worker output unrouted", RAY_HANDLER
        )
        return False
    if getattr(original, "medimg_router", False):
        return True
    dispatcher.remove_handler(RAY_HANDLER)  # ray.shutdown removes the router by this name
    dispatcher.add_handler(RAY_HANDLER, _router(original))
    return True
