"""Rounds and reporting of ``benchmarks/serving_side_by_side.py``: one round over every path back to
back, medians over the quiet rounds, the ratios against their targets, the table, the
``serving.{json,md}`` files and the ``serving.csv`` row, and the fixed last line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.perf.accounting import PathResult, measured
from serving.perf.comparison.paths import (
    inprocess_best,
    inprocess_latency,
    inprocess_parallel,
    naive_level,
)

TARGETS = {"served/inprocess": 0.90, "served/naive": 3.0, "p99c1/inprocess_b1": 1.5}


# ---------------------------------------------------------------- rounds


@dataclass
class Round:
    """One pass over every path, back to back, so machine noise hits them alike. (a) is
    measured on both sides of (b) at concurrency N, and batch-1 latency on both sides of
    concurrency 1, so a drift in the machine's speed during the round cancels out. With
    perf_analyzer as (b)'s load generator, (b') is the same load from medimg's own Python
    client, measured right after (b) inside the same brackets: for information."""

    inprocess: PathResult  # best batch, before (b)
    inprocess_after: PathResult  # best batch, after (b)
    inprocess_b1: PathResult  # batch-1 latency, half before and half after (b) c1, pooled
    served: PathResult  # concurrency N
    served_c1: PathResult
    naive: PathResult
    inprocess_parallel: PathResult  # information: not in the ratios
    client: PathResult | None = None  # (b') concurrency N, medimg's client
    client_c1: PathResult | None = None

    def rows(self) -> list[PathResult]:
        rows = [self.inprocess, self.served, self.client, self.inprocess_after]
        rows += [self.inprocess_parallel, self.naive, self.inprocess_b1]
        return [r for r in [*rows, self.served_c1, self.client_c1] if r is not None]

    def others_cpu(self) -> float:
        """The most CPU other processes took during any of this round's measurements."""
        return max(r.others_cpu for r in self.rows())

    def inprocess_rate(self) -> float:
        return (self.inprocess.throughput + self.inprocess_after.throughput) / 2

    def parallel_ratio(self) -> float:
        return self.served.throughput / self.inprocess_parallel.throughput

    def ratios(self) -> dict[str, float]:
        return {
            "served/inprocess": self.served.throughput / self.inprocess_rate(),
            "served/naive": self.served.throughput / self.naive.throughput,
            "p99c1/inprocess_b1": self.served_c1.p99_ms / self.inprocess_b1.p99_ms,
        }

    def client_ratio(self) -> float | None:
        """(b') against (a): what medimg's Python client gets of in-process speed."""
        return self.client.throughput / self.inprocess_rate() if self.client else None


def measure_round(
    sessions: tuple, images: np.ndarray, best: int, urls: tuple[str, str], loads: tuple, args
) -> Round:
    """(a) best batch, (b) concurrency N, [(b')], (a) best batch again, (a') parallel
    one-thread sessions, (c) concurrency N, (a) batch 1, (b) concurrency 1, [(b')],
    (a) batch 1 again. ``loads`` is ``(load, client_load)``: functions of the concurrency
    that measure (b) and (b') (``client_load`` None: no (b'))."""
    (session, singles), (_, naive_url), (load, client_load) = sessions, urls, loads
    inprocess = measured(inprocess_best, session, images, best, args.sweep_s)
    served = measured(load, args.concurrency)
    client = measured(client_load, args.concurrency) if client_load else None
    inprocess_after = measured(inprocess_best, session, images, best, args.sweep_s)
    parallel = measured(inprocess_parallel, singles, images, best, args.sweep_s)
    naive = measured(naive_level, naive_url, images[0], args)
    half = max(1, args.latency_runs // 2)
    b1_before = measured(inprocess_latency, session, images, half)
    c1 = measured(load, 1)
    client_c1 = measured(client_load, 1) if client_load else None
    b1_after = measured(inprocess_latency, session, images, half)
    b1 = pooled([b1_before, b1_after])
    return Round(inprocess, inprocess_after, b1, served, c1, naive, parallel, client, client_c1)


def pooled(rows: list[PathResult]) -> PathResult:
    """One row from several measurements of one path: latency percentiles over all their
    samples together, throughput and others' CPU the median, requests and failures summed."""
    first = rows[0]
    med = lambda key: float(np.median([getattr(r, key) for r in rows]))  # noqa: E731
    samples = [ms for r in rows for ms in r.samples_ms]
    p50, p99 = (
        (float(np.percentile(samples, 50)), float(np.percentile(samples, 99)))
        if samples
        else (med("p50_ms"), med("p99_ms"))
    )
    extra = {k: float(np.median([r.extra.get(k, 0.0) for r in rows])) for k in first.extra}
    return PathResult(
        first.path,
        first.label,
        first.concurrency,
        first.batch_size,
        med("throughput"),
        p50,
        p99,
        sum(r.requests for r in rows),
        sum(r.failed for r in rows),
        extra,
        med("others_cpu"),
        samples,
    )


def summary_rows(rounds: list[Round]) -> list[PathResult]:
    """One row per path over ``rounds``: (a) best batch pools the runs before and after (b)."""
    rows = [pooled([r.inprocess_b1 for r in rounds])]
    rows.append(pooled([x for r in rounds for x in (r.inprocess, r.inprocess_after)]))
    for name in ("inprocess_parallel", "served_c1", "client_c1", "served", "client", "naive"):
        if getattr(rounds[0], name) is not None:
            rows.append(pooled([getattr(r, name) for r in rounds]))
    return rows


def quiet_rounds(rounds: list[Round], threshold: float) -> list[Round]:
    """The rounds in which other processes never took more than ``threshold`` cores;
    all rounds when none was that quiet."""
    quiet = [r for r in rounds if r.others_cpu() <= threshold]
    return quiet or rounds


def median_ratios(rounds: list[Round]) -> dict[str, float]:
    """Throughput ratios: the median of the per-round ratios. p99: over every request of
    every round pooled, on both sides (a round's p99 rests on its few slowest requests)."""
    per_round = [r.ratios() for r in rounds]
    values = {k: float(np.median([p[k] for p in per_round])) for k in TARGETS}
    b1 = pooled([r.inprocess_b1 for r in rounds])
    c1 = pooled([r.served_c1 for r in rounds])
    values["p99c1/inprocess_b1"] = c1.p99_ms / b1.p99_ms
    return values


def client_lines(rounds: list[Round]) -> list[str]:
    """(b')'s ratios, for information: the same targets, medimg's Python client as the load."""
    if rounds[0].client is None:
        return []
    ratio = float(np.median([r.client_ratio() for r in rounds]))
    b1 = pooled([r.inprocess_b1 for r in rounds])
    c1 = pooled([r.client_c1 for r in rounds if r.client_c1 is not None])
    return [
        f"{'served/inprocess':<20} {ratio:6.3f}  (information: (b') medimg's Python client "
        "as the load generator)",
        f"{'p99c1/inprocess_b1':<20} {c1.p99_ms / b1.p99_ms:6.3f}  (information: (b'))",
    ]


def spread(rounds: list[Round]) -> dict[str, tuple[float, float]]:
    """The lowest and highest per-round value of every ratio: how much to trust a median."""
    per_round = [r.ratios() for r in rounds]
    return {k: (min(p[k] for p in per_round), max(p[k] for p in per_round)) for k in TARGETS}


# ---------------------------------------------------------------- report


def row_text(row: PathResult) -> str:
    conc = str(row.concurrency) if row.concurrency else "-"
    lat = f"{row.p50_ms:7.2f} {row.p99_ms:7.2f}" if row.p50_ms else f"{'-':>7} {'-':>7}"
    server = ""
    if row.extra:
        server = (
            f"  server: queue {row.extra.get('queue_us', 0) / 1000:.2f} ms, "
            f"infer {row.extra.get('compute_infer_us', 0) / 1000:.2f} ms, "
            f"batch {row.extra.get('avg_batch', 0):.1f}; "
            f"load generator CPU {row.extra.get('client_cpu_ms', 0):.2f} ms"
        )
    failed = f"  {row.failed} failed" if row.failed else ""
    return (
        f"{row.label:<52} {conc:>4} {row.batch_size:>5} {row.throughput:9.1f} {lat} "
        f"{row.others_cpu:6.2f}{server}{failed}"
    )


def table(rows: list[PathResult]) -> str:
    head = (
        f"{'path':<52} {'conc':>4} {'batch':>5} {'img/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'others':>6}"
    )
    note = "others: cores other users' processes kept busy during the measurement (noise)"
    return "\n".join([head, "-" * len(head), *(row_text(r) for r in rows), note])


def ratio_lines(values: dict) -> list[str]:
    lines = []
    for key, value in values.items():
        target = TARGETS[key]
        ok = value <= target if key.startswith("p99") else value >= target
        sign = "<=" if key.startswith("p99") else ">="
        lines.append(
            f"{key:<20} {value:6.3f}  (target {sign} {target}: {'met' if ok else 'NOT met'})"
        )
    return lines


def last_line(values: dict) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in values.items())


# columns added after the first runs, with the value those runs had
CSV_ADDED = {"load_generator": "medimg", "shared_memory": "none"}


def write_results(out_dir: Path, report: dict, text: str) -> None:
    """``serving.json`` and ``serving.md`` (this run), one row appended to ``serving.csv``
    (an older file gets the columns added since, filled with what its runs used)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "serving.md").write_text(text)
    path = out_dir / "serving.csv"
    row = {
        "time": report["time"],
        "protocol": report["options"]["protocol"],
        "load_generator": report["options"]["load_generator"],
        "shared_memory": report["options"]["shared_memory"],
        "concurrency": report["options"]["concurrency"],
        "duration_s": report["options"]["duration_s"],
        "repository": report["repository_options"],
        **{k: f"{v:.3f}" for k, v in report["ratios"].items()},
        "load_before": report["load_average"][0],
        "load_after": report["load_average"][1],
    }
    rows = []
    if path.exists():
        with open(path, newline="") as fh:
            rows = [{**CSV_ADDED, **old} for old in csv.DictReader(fh)]
    partial = path.with_name(path.name + ".partial")  # renamed over it: never half a file
    with open(partial, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        writer.writeheader()
        writer.writerows([*rows, row])
    partial.replace(path)


def markdown(report: dict, rows: list[PathResult], lines: list[str]) -> str:
    body = [
        f"# benchmarks/serving_side_by_side.py — {report['time']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}; load average before/after "
        f"{report['load_average'][0]:.2f} / {report['load_average'][1]:.2f}",
        "",
        *(f"- {note}" for note in report["notes"]),
        "",
        "| path | concurrency | batch | img/s | p50 ms | p99 ms | others' CPU | "
        "server queue / infer ms, batch, load generator CPU ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        server = (
            f"{r.extra.get('queue_us', 0) / 1000:.2f} / "
            f"{r.extra.get('compute_infer_us', 0) / 1000:.2f}, {r.extra.get('avg_batch', 0):.1f}, "
            f"{r.extra.get('client_cpu_ms', 0):.2f}"
            if r.extra
            else ""
        )
        lat = (f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}") if r.p50_ms else ("", "")
        body.append(
            f"| {r.label} | {r.concurrency or ''} | {r.batch_size} | {r.throughput:.1f} | "
            f"{lat[0]} | {lat[1]} | {r.others_cpu:.2f} | {server} |"
        )
    return "\n".join([*body, "", "```", *lines, "```", ""])
