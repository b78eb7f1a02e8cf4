"""The side-by-side serving benchmark's run (``benchmarks/serving_side_by_side.py``): prepare
the model, sweep (a) in-process batch sizes, then ``--rounds`` rounds of (a), (b) Triton and
(c) the naive server back to back; print the table and the ratios, and save the report
(``serving.{json,md}`` and a ``serving.csv`` row) into the run's folders::

    python benchmarks/serving_side_by_side.py --data-dir ../shared/data --rounds 1 \\
        --duration-s 2 --train-steps 0 --load-generator medimg
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from pathlib import Path

import numpy as np

from serving.perf.accounting import BenchError, PathResult
from serving.perf.comparison.model import Prepared, config_summary, options_summary, prepare
from serving.perf.comparison.paths import (
    inprocess_sweep,
    naive_server,
    ort_session,
    triton_level,
    triton_server,
)
from serving.perf.comparison.report import (
    Round,
    client_lines,
    last_line,
    markdown,
    measure_round,
    median_ratios,
    quiet_rounds,
    ratio_lines,
    row_text,
    spread,
    summary_rows,
    table,
    write_results,
)
from serving.perf.comparison.settings import Settings
from serving.perf.perf_analyzer import locate, pa_level, write_input

Load = Callable[[int], PathResult]


def loads(
    prepared: Prepared, images: np.ndarray, args: Settings, workdir: Path, url: str
) -> tuple[Load, Load | None]:
    """``(load, client_load)`` for :func:`serving.perf.comparison.report.measure_round`: (b)
    through perf_analyzer and (b') through medimg's client, or (b) through medimg's client
    alone."""
    client = partial(triton_level, url, prepared.classifier, args)
    if args.load_generator == "medimg":
        return client, None
    pa = locate(args.perf_analyzer)
    prepared.notes.append(f"(b) load generator: {pa.version()} ({pa.binary})")
    print(f"  {prepared.notes[-1]}", flush=True)
    data = write_input(images, prepared.spec.input_name, workdir / "perf_analyzer_input.json")
    return partial(pa_level, pa, url, prepared.classifier, args, input_json=data), partial(
        triton_level, url, prepared.classifier, args, label="(b')"
    )


def run_rounds(
    prepared: Prepared, images: np.ndarray, best: int, args: Settings, workdir: Path
) -> list[Round]:
    """Both servers up (idle between their turns), then ``--rounds`` rounds."""
    sessions = (
        ort_session(prepared.onnx_path),
        [ort_session(prepared.onnx_path, 1) for _ in range(os.cpu_count() or 1)],
    )
    rounds = []
    with (
        triton_server(prepared.repository, args.protocol) as triton_url,
        naive_server(prepared.weights, workdir) as naive_url,
    ):
        load = loads(prepared, images, args, workdir, triton_url)
        for i in range(1, args.rounds + 1):
            print(f"round {i}/{args.rounds}", flush=True)
            one = measure_round(sessions, images, best, (triton_url, naive_url), load, args)
            for row in one.rows():
                print(f"  {row_text(row)}", flush=True)
            print(f"  {last_line(one.ratios())} (others' CPU {one.others_cpu():.2f})", flush=True)
            rounds.append(one)
    return rounds


def summary_lines(rounds: list[Round], used: list[Round], quiet_cpu: float) -> list[str]:
    """The table, the ratios against their targets and what they rest on."""
    which = (
        f"the {len(used)} of {len(rounds)} rounds in which other processes took at most "
        f"{quiet_cpu} cores"
        if len(used) < len(rounds) or all(r.others_cpu() <= quiet_cpu for r in rounds)
        else f"all {len(rounds)} rounds (none had other processes at <= {quiet_cpu} cores)"
    )
    return [
        f"medians over {which}; throughput ratios are the medians of the per-round ratios "
        "((a) measured before and after (b) in every round); p99 over every request of "
        "those rounds pooled",
        table(summary_rows(used)),
        "",
        *ratio_lines(median_ratios(used)),
        *client_lines(used),
        "per-round range: "
        + ", ".join(f"{k} {lo:.2f}..{hi:.2f}" for k, (lo, hi) in spread(used).items()),
        f"{'served/inprocess_par':<20} "
        f"{float(np.median([r.parallel_ratio() for r in used])):6.3f}  (information: against "
        "(a'), one-thread sessions side by side, no target)",
    ]


def run(args: Settings, workdir: Path) -> tuple[dict, str]:
    """Prepare the model, sweep (a), then rounds of (a), (b), (c); print the table and the
    ratios. Returns the report (JSON-ready; its ``last_line`` the fixed last line) and its
    markdown text, for :func:`save`."""
    load_before = os.getloadavg()[0]
    prepared, images = prepare(args, workdir)
    for note in prepared.notes:
        print(f"note: {note}", flush=True)
    print("(a) ONNX Runtime in process: batch-size sweep", flush=True)
    sweep = inprocess_sweep(ort_session(prepared.onnx_path), images, args.batch_sizes, args.sweep_s)
    if not sweep:
        raise BenchError(f"{prepared.onnx_path}: no batch size of {args.batch_sizes} ran")
    best = max(sweep, key=lambda r: r.throughput).batch_size
    print(
        f"(a) best batch {best}; rounds of (a), (b) Triton {args.protocol} "
        f"({args.load_generator}) on {prepared.classifier}, (c) naive",
        flush=True,
    )
    rounds = run_rounds(prepared, images, best, args, workdir)
    used = quiet_rounds(rounds, args.quiet_cpu)
    rows = summary_rows(used)
    values = median_ratios(used)
    lines = summary_lines(rounds, used, args.quiet_cpu)
    print("\n" + "\n".join(lines), flush=True)
    report = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}",
        "load_average": [load_before, os.getloadavg()[0]],
        "options": args.public(),
        "repository_options": config_summary(prepared.repository, prepared.classifier)
        if args.model_repository
        else options_summary(args.repository_options()),
        "notes": prepared.notes,
        "inprocess_sweep": [r.public() for r in sweep],
        "rows": [r.public() for r in rows],
        "rounds": [round_report(r, r in used) for r in rounds],
        "ratios": values,
        "last_line": last_line(values),
    }
    return report, markdown(report, rows, [*lines, last_line(values)])


def round_report(one: Round, quiet: bool) -> dict:
    """One round for the JSON report: its rows, ratios, whether it counted, others' CPU."""
    rows = {f.name: getattr(one, f.name) for f in fields(one)}
    return {
        **{name: row.public() for name, row in rows.items() if row is not None},
        "ratios": one.ratios(),
        "quiet": quiet,
        "others_cpu": one.others_cpu(),
    }


def save(report: dict, text: str, folders: list[Path]) -> list[Path]:
    """``serving.json`` and ``serving.md`` into every folder (this run's ``--out`` and, with
    ``--record``, the record folder), and the run's row appended to each ``serving.csv``."""
    for folder in folders:
        write_results(folder, report, text)
    return [folder / "serving.json" for folder in folders]
