"""What every part of the serving benchmarks (``serving.perf.comparison``) shares: the error
a user can act on, the measured row, and the accounting of the CPU other people's processes
took during a measurement (read from /proc: the machine's busy time minus this benchmark's
process tree)::

    python -c "from serving.perf.accounting import others_cpu; import time
with others_cpu() as cores: time.sleep(1)
print(cores)"
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field


@dataclass
class PathResult:
    """One measured row of the table."""

    path: str  # "inprocess", "triton", "naive"
    label: str
    concurrency: int
    batch_size: int
    throughput: float  # images/s
    p50_ms: float
    p99_ms: float
    requests: int
    failed: int = 0
    extra: dict = field(default_factory=dict)
    others_cpu: float = 0.0  # cores other users' processes kept busy meanwhile (noise)
    samples_ms: list = field(default_factory=list, repr=False)  # every latency, for pooling

    def public(self) -> dict:
        """The row for JSON: everything but the raw latencies."""
        return {k: v for k, v in asdict(self).items() if k != "samples_ms"}


class BenchError(Exception):
    """A problem the user can act on (missing data, bad options, a server that died)."""


# ---------------------------------------------------------------- noise


def _busy_jiffies() -> int:
    """CPU time (clock ticks) every process on the machine has used since boot."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, fh.readline().split()[1:9]
        )
    return user + nice + system + irq + softirq + steal


def _stat(pid: int | str) -> tuple[int, int]:
    """(parent pid, CPU time in clock ticks: utime + stime) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields_ = fh.read().rsplit(")", 1)[1].split()
    return int(fields_[1]), int(fields_[11]) + int(fields_[12])


def process_jiffies(pid: int) -> int:
    """CPU time (clock ticks) of ``pid`` itself, without its children."""
    return _stat(pid)[1]


def tree_jiffies(root: int) -> int:
    """CPU time (clock ticks) of ``root`` and all its live descendants."""
    parent, used = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            parent[int(entry)], used[int(entry)] = _stat(entry)
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


@contextlib.contextmanager
def others_cpu() -> Iterator[list[float]]:
    """Measures how many cores processes outside this benchmark's own process tree kept
    busy during the block (other people's work on a shared machine); the value is in the
    yielded list once the block ends. 0 where /proc is unavailable."""
    out: list[float] = []
    try:
        start = (time.perf_counter(), _busy_jiffies(), tree_jiffies(os.getpid()), _reaped())
    except OSError:
        start = None
    try:
        yield out
    finally:
        if start is None:
            out.append(0.0)
        else:
            elapsed = time.perf_counter() - start[0]
            busy = _busy_jiffies() - start[1]
            ours = tree_jiffies(os.getpid()) - start[2] + _reaped() - start[3]
            out.append(max(0.0, (busy - ours) / os.sysconf("SC_CLK_TCK") / elapsed))


def _reaped() -> int:
    """Jiffies of our child processes that have ended and been waited for (perf_analyzer):
    gone from /proc, so :func:`tree_jiffies` no longer sees them."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round((r.ru_utime + r.ru_stime) * os.sysconf("SC_CLK_TCK"))


def measured(fn: Callable[..., PathResult], *args) -> PathResult:
    """``fn(*args)`` with the others' CPU during it recorded on the row."""
    with others_cpu() as cpu:
        row = fn(*args)
    row.others_cpu = cpu[0]
    return row
