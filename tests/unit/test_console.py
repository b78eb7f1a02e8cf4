"""The console of train/tune/pipeline, without processes: progress records drawn as one
line per epoch (or per change of the trials), what reaches the console and what only the
run's log file, Ray workers' records relayed as records, everything put back on exit."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

from training import progress
from training.console import LOG_FILE, RunConsole, announce_run_dir
from training.worker_logs import MARK, WORKER_OUTPUT, _router, decode, relay_to_driver


def _epochs(n: int) -> None:
    for e in range(1, n + 1):
        for s in (25, 50):
            progress.step(e, n, s, 50, 0.5, 100.0, s * 0.2)
        progress.epoch(e, n, train_loss=0.4, val_auc=0.81, val_acc=0.7, images_per_s=90, seconds=12)


def test_one_plain_line_per_epoch_and_per_change_of_the_trials() -> None:
    out = io.StringIO()
    with RunConsole("train", stream=out, live=False):
        _epochs(3)
    lines = out.getvalue().splitlines()
    assert lines == [
        "epoch 1/3  loss 0.4000  val AUC 0.8100  90 img/s  12 s  ETA 0:24",
        "epoch 2/3  loss 0.4000  val AUC 0.8100  90 img/s  12 s  ETA 0:12",
        "epoch 3/3  loss 0.4000  val AUC 0.8100  90 img/s  12 s  ETA 0:00",
    ]
    out = io.StringIO()
    with RunConsole("tune", stream=out, live=False):
        _epochs(1)  # a trial's epochs: not this display's
        for done, running, best in [(0, 1, None), (0, 1, None), (0, 1, 0.7), (1, 1, 0.75)]:
            progress.trials(done, running, 4, best)
    assert out.getvalue().splitlines() == [
        "trials 0/4 done  1 running  best val AUC -",
        "trials 0/4 done  1 running  best val AUC 0.7000",
        "trials 1/4 done  1 running  best val AUC 0.7500",
    ]


def test_the_live_bar_ends_with_the_last_epoch() -> None:
    out = io.StringIO()
    with RunConsole("train", stream=out, live=True) as console:
        _epochs(2)
        assert console.display._bar is None  # stopped by epoch 2/2
        logging.getLogger("training.driver").info("after the bar")
    text = out.getvalue()
    assert "epoch 2/2" in text and "100%" in text and "val AUC 0.8100" in text
    assert text.rstrip().endswith("INFO training.driver: after the bar")


def test_libraries_go_to_the_log_file_ours_to_the_console(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = (root.handlers[:], root.level, sys.stdout, sys.stderr)
    out = io.StringIO()
    with RunConsole("train", stream=out, live=False) as console, console.quiet():
        logging.getLogger("mlflow.pytorch").warning("a library warning")
        print("a library print")
        announce_run_dir(logging.getLogger("training.driver"), str(tmp_path / "run"))
        logging.getLogger("training.driver").info("our message")
        logging.getLogger("ray.tune").error("a library error")
        logging.getLogger(WORKER_OUTPUT).info("(RayTrainWorker pid=1) Reporting training result")
        for rank in (0, 1):
            relayed = decode(_relay_line(rank, "resumed from /ckpt"), "10.0.0.2")
            logging.getLogger(relayed.name).handle(relayed)
    assert console.log_path == tmp_path / "run" / LOG_FILE
    shown = out.getvalue().splitlines()
    assert shown == [
        f"log file: {tmp_path / 'run' / LOG_FILE}",
        "INFO training.driver: our message",
        "ERROR ray.tune: a library error",
        "INFO training.ray_trainer: resumed from /ckpt",  # rank 0 only
    ]
    logged = console.log_path.read_text()
    for text in (
        "WARNING mlflow.pytorch: a library warning",  # held until the run directory was known
        "INFO py.stdout: a library print",
        "Reporting training result",
        "training.ray_trainer [worker rank 1 pid 7]: resumed from /ckpt",
        "our message",
    ):
        assert text in logged, (text, logged)
    assert (root.handlers, root.level, sys.stdout, sys.stderr) == before


def test_verbose_shows_everything_and_hidden_warnings_survive_a_run_without_a_directory() -> None:
    out = io.StringIO()
    with RunConsole("train", verbose=True, stream=out, live=False):
        logging.getLogger("mlflow").info("library info")
        logging.getLogger(WORKER_OUTPUT).info("(TrainController pid=2) Requesting resources")
    assert out.getvalue().splitlines() == [
        "INFO mlflow: library info",
        "(TrainController pid=2) Requesting resources",
    ]
    out = io.StringIO()
    with RunConsole("train", stream=out, live=False):  # fails before its run directory
        logging.getLogger("mlflow").info("library info")
        logging.getLogger("mlflow").warning("library warning")
    assert out.getvalue().splitlines() == ["WARNING mlflow: library warning"]


def _relay_line(rank: int, message: str) -> str:
    """What :func:`relay_to_driver` writes for an INFO record in a worker of ``rank``."""
    logger = logging.getLogger("training")
    saved = (logger.handlers[:], logger.level, logger.propagate, sys.stderr)
    sys.stderr = io.StringIO()
    try:
        relay_to_driver(rank)
        handler = logger.handlers[-1]
        handler.handle(
            logging.getLogger("training.ray_trainer").makeRecord(
                "training.ray_trainer", logging.INFO, __file__, 1, message, None, None
            )
        )
        line = sys.stderr.getvalue()
    finally:
        logger.handlers, logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])
        sys.stderr = saved[3]
    payload = json.loads(line[len(MARK) :])
    return MARK + json.dumps({**payload, "pid": 7})  # a pid to look for


def test_the_router_turns_relayed_lines_into_records_and_leaves_rays_alone() -> None:
    printed: list[dict] = []
    route = _router(printed.append)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    logger = logging.getLogger("training")
    logger.addHandler(keep)
    level, logger.level = logger.level, logging.INFO
    try:
        route({"pid": 5, "ip": "10.0.0.2", "lines": [_relay_line(0, "hello"), "Ray's own line"]})
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    assert [(r.name, r.getMessage(), r.worker["rank"]) for r in seen] == [
        ("training.ray_trainer", "hello", 0)
    ]
    assert printed == [{"pid": 5, "ip": "10.0.0.2", "lines": ["Ray's own line"]}]  # no console
    assert decode("Ray's own line") is None
    assert decode('medimg-log {"name": "os", "level": 20, "msg": "x"}') is None  # not ours
