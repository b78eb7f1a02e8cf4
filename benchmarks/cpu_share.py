"""Who uses the CPU while something runs: every process's CPU seconds over a window, by
name, as a share of all cores. Run it beside a training run to see what Ray's own
processes take from the worker::

    medimg train --dataset pneumoniamnist --data-dir ../shared/data --epochs 6 &
    sleep 60; python benchmarks/cpu_share.py --seconds 20
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import psutil


def cpu_seconds() -> dict[tuple[int, str], float]:
    out = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            times = proc.cpu_times()
            cmd = proc.info["cmdline"] or [proc.info["name"] or "?"]
            name = cmd[0] if cmd[0].startswith("ray::") else cmd[0].split("/")[-1]
            if name.startswith("python") and len(cmd) > 1:  # a Python program: its script
                name = f"{name} {cmd[1].split('/')[-1]}"
            out[(proc.info["pid"], name[:40])] = times.user + times.system
        except psutil.Error:
            continue
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    before = cpu_seconds()
    time.sleep(args.seconds)
    after = cpu_seconds()
    by_name: dict[str, float] = defaultdict(float)
    for key, used in after.items():
        if key in before and key[0] != os.getpid():
            by_name[key[1]] += used - before[key]
    cores = psutil.cpu_count() or 1
    total = args.seconds * cores
    print(f"| process | CPU s in {args.seconds:.0f} s | share of {cores} cores |")
    print("| --- | ---: | ---: |")
    for name, used in sorted(by_name.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {name} | {used:.2f} | {used / total:.1%} |")
    print(f"| all | {sum(by_name.values()):.2f} | {sum(by_name.values()) / total:.1%} |")


if __name__ == "__main__":
    main()
