"""``medimg bench`` and ``medimg tune-server``.

medimg bench --model pneumoniamnist-densenet121 --protocol grpc --concurrency 1,4,16 --duration-s 5
medimg tune-server --model pneumoniamnist-densenet121 --concurrency 1,16 --p99-budget-ms 15
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from serving.cli.options import levels_arg
from serving.clients.contract import PROTOCOLS
from serving.perf.bench import BenchOptions, describe, plot_curve, run_bench, write_csv
from serving.perf.tune_server import (
    Trial,
    check_result,
    current_knobs,
    default_space,
    rank,
    sweep,
    trial_rows,
    write_best,
)
from serving.repository.layout import check_writable


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="throughput and latency per concurrency level (perf_analyzer-like)"
    )
    p.add_argument(
        "--url", default="", help="HOST:PORT (default 127.0.0.1:8000 for http, :8001 for grpc)"
    )
    p.add_argument("--protocol", choices=PROTOCOLS, default="http")
    p.add_argument(
        "--model",
        default="",
        help="ensemble (image bytes) or NAME_onnx (tensors); default: the only ensemble",
    )
    p.add_argument(
        "--concurrency",
        type=levels_arg,
        default=(1, 2, 4, 8, 16, 32),
        help="levels (default 1,2,4,8,16,32)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="images per request (default 1)")
    p.add_argument("--duration-s", type=float, default=5.0, help="measured per level (default 5)")
    p.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured, per level (default 1)")
    p.add_argument("--input", default="random", help="an image file, or random (default)")
    p.add_argument(
        "--shared-memory",
        action="store_true",
        help="tensors through system shared memory (NAME_onnx; the server must run on this "
        "machine)",
    )
    p.add_argument("--out", default="bench-results", help="folder for the CSV and PNG")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    opts = BenchOptions(
        url=args.url,
        protocol=args.protocol,
        model=args.model,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        input=args.input,
        shared_memory=args.shared_memory,
    )
    check_writable(Path(args.out), f"--out {args.out}")
    total = len(opts.concurrency) * (opts.duration_s + opts.warmup_s)
    print(f"{len(opts.concurrency)} level(s), about {total:.0f} s", flush=True)
    results = run_bench(opts, on_level=lambda r: print(describe(r), flush=True))
    name = (args.model or "ensemble").replace("/", "_")
    stem = Path(args.out) / f"bench-{name}-{args.protocol}-b{args.batch_size}"
    csv_path = write_csv(results, stem.with_suffix(".csv"))
    png = plot_curve(
        results, stem.with_suffix(".png"), f"{name} over {args.protocol}, batch {args.batch_size}"
    )
    print(f"wrote {csv_path} and {png}")
    failed = sum(r.failed for r in results)
    for r in results:
        for error in r.errors:
            print(f"error: concurrency {r.concurrency}: {error}", file=sys.stderr)
    if failed:
        print(f"error: {failed} request(s) failed", file=sys.stderr)
    return 1 if failed else 0


def add_tune_server_parser(sub) -> None:
    p = sub.add_parser(
        "tune-server",
        help="sweep batching, instances and threads on the bench; write the best config",
    )
    p.add_argument("--model", required=True, help="the ensemble's NAME")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    p.add_argument(
        "--send",
        choices=("tensors", "images"),
        default="images",
        help="bench the ensemble with image bytes (default) or NAME_onnx with tensors",
    )
    p.add_argument(
        "--concurrency",
        type=levels_arg,
        default=(1, 16),
        help="levels; score = throughput at the highest (default 1,16)",
    )
    p.add_argument(
        "--p99-budget-ms",
        type=float,
        default=0.0,
        help="p99 at the lowest level must fit (0: no limit)",
    )
    p.add_argument("--duration-s", type=float, default=4.0)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument(
        "--min-gain",
        type=float,
        default=0.10,
        help="write only if this much better than the current config (default 0.10; runs on "
        "a shared machine vary by about that much)",
    )
    p.add_argument("--dry-run", action="store_true", help="measure and report; write nothing")
    p.add_argument("--out", default="bench-results", help="folder for the trials CSV")
    p.set_defaults(func=cmd_tune_server)


def cmd_tune_server(args: argparse.Namespace) -> int:
    repository = Path(args.repository)
    knobs, models = current_knobs(repository, args.model)
    target = models.ensemble.name if args.send == "images" else models.classifier.name
    bench = BenchOptions(
        protocol=args.protocol,
        model=target,
        concurrency=args.concurrency,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
    )
    space = default_space(send=args.send)
    trials = 1 + sum(len(v) for v in space.values())
    print(
        f"current: {knobs.label()}\nup to {trials} trials of about "
        f"{len(bench.concurrency) * (bench.duration_s + bench.warmup_s) + 10:.0f} s",
        flush=True,
    )

    def show(t: Trial) -> None:
        mark = "" if t.feasible else "  (infeasible)"
        print(
            f"  {t.knobs.label():<60} {t.throughput:8.1f} infer/s  p99@{min(bench.concurrency)} "
            f"{t.p99_low_ms:6.2f} ms{mark}",
            flush=True,
        )

    baseline, trials_run = sweep(
        repository, args.model, bench, space=space, p99_budget_ms=args.p99_budget_ms, on_trial=show
    )
    best = max(trials_run, key=rank)
    out = Path(args.out) / f"tune-server-{args.model}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(trials_run)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"trials: {out}")
    print(
        f"best:    {best.knobs.label()}  {best.throughput:.1f} infer/s "
        f"({best.throughput / max(baseline.throughput, 1e-9):.2f}x the current config)"
    )
    if not check_result(best, baseline, args.min_gain):
        print("the current config is within --min-gain of the best: left unchanged")
        return 0
    if args.dry_run:
        print("--dry-run: nothing written")
        return 0
    for path in write_best(repository, args.model, best.knobs):
        print(f"wrote {path} (previous: config.pbtxt.before-tune)")
    return 0


def register(sub) -> None:
    add_bench_parser(sub)
    add_tune_server_parser(sub)
