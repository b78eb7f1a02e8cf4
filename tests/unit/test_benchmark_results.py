"""Where the benchmarks' results go (``serving.perf.comparison.output`` and the side-by-side
benchmark's ``save``): a run writes into its own ``--out`` folder, and into the record
folder only with ``--record``, whose ``serving.csv`` then gains the run's row::

    python -m pytest tests/unit/test_benchmark_results.py -q
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from serving.perf.comparison.output import RUNS_DIR, destinations, run_folder, write_text
from serving.perf.comparison.side_by_side import save
from training.errors import ConfigError

REPORT = {
    "time": "2026-12-02 10:00:00",
    "options": {
        "protocol": "grpc",
        "load_generator": "medimg",
        "shared_memory": "none",
        "concurrency": 16,
        "duration_s": 2.0,
    },
    "repository_options": "max_queue_delay_us=500 preferred=8",
    "ratios": {"served/inprocess": 0.91, "served/naive": 3.2, "p99c1/inprocess_b1": 1.4},
    "load_average": [0.5, 1.0],
    "last_line": "served/inprocess=0.91 served/naive=3.20 p99c1/inprocess_b1=1.40",
}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_record_writes_the_run_into_the_results_folder_too(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    old = "time,protocol,concurrency,duration_s,repository,served/inprocess\r\n"
    (results / "serving.csv").write_text(old + "2026-11-20 10:00:00,grpc,16,10.0,,0.870\r\n")
    folders = destinations(tmp_path / "run", results)
    assert folders == [tmp_path / "run", results]
    save(REPORT, "# the report\n", folders)
    for folder in folders:
        assert json.loads((folder / "serving.json").read_text()) == REPORT
        assert (folder / "serving.md").read_text() == "# the report\n"
    assert [r["served/inprocess"] for r in _csv_rows(tmp_path / "run" / "serving.csv")] == ["0.910"]
    assert [r["served/inprocess"] for r in _csv_rows(results / "serving.csv")] == [
        "0.870",
        "0.910",
    ]


def test_without_record_only_the_run_folder_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_folder("serving")
    assert out.parent == Path(RUNS_DIR) and out.name.startswith("serving-")
    folders = destinations(out)
    save(REPORT, "text", folders)
    assert folders == [out]
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*"))
    assert written == [f"{out.as_posix()}/serving.{ext}" for ext in ("csv", "json", "md")]


def test_text_results_go_to_every_folder(tmp_path):
    folders = destinations(tmp_path / "out", tmp_path / "record")
    paths = write_text(folders, "serving_sweep.md", "| table |\n")
    assert paths == [
        tmp_path / "out" / "serving_sweep.md",
        tmp_path / "record" / "serving_sweep.md",
    ]
    assert all(p.read_text() == "| table |\n" for p in paths)


def test_an_unwritable_out_is_refused_before_the_run(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"--out {blocker / 'run'}: cannot write in"):
        destinations(blocker / "run")
    with pytest.raises(ConfigError, match=f"--record into {blocker}: cannot write in"):
        destinations(tmp_path / "run", blocker)
