"""``medimg bench``: what perf_analyzer gives Triton users, on our own asyncio client.

For each concurrency level N, N closed-loop clients send requests back to back for
``duration_s`` (after ``warmup_s`` not measured); it reports throughput
(inferences/s), client latency p50/p90/p95/p99 and, from Triton's statistics API, the
server-side split per request (queue, compute input, compute infer, compute output;
summed over an ensemble's steps, like perf_analyzer), the classifier's average batch
size, and the CPU this process -- the load generator -- spent per request (on a machine
it shares with the server, CPU the server did not get). Results go to a CSV and a PNG
latency-throughput curve::

    medimg bench --model pneumoniamnist-densenet121 --protocol grpc --concurrency 1,4,16 \
        --duration-s 5
    medimg bench --model pneumoniamnist-densenet121_onnx \
        --input ../shared/data/samples/00000001_000.png
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from serving.clients.aio import AsyncTritonClassifier
from serving.clients.contract import bytes_batch
from serving.clients.inputs import png_bytes
from serving.clients.shm import SharedMemorySlots
from training.errors import ConfigError, ServingError
from training.images import read_image
from training.spec import ModelSpec

SPLIT = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class BenchOptions:
    url: str = ""
    protocol: str = "http"
    model: str = ""  # an ensemble (encoded images) or a classifier (tensors); "": the ensemble
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    batch_size: int = 1
    duration_s: float = 5.0
    warmup_s: float = 1.0
    input: str = "random"  # or an image file
    shared_memory: bool = False  # tensors through system shared memory (NAME_onnx only)
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ConfigError(f"concurrency: expected levels >= 1, got {self.concurrency}")
        if self.batch_size < 1 or self.duration_s <= 0 or self.warmup_s < 0:
            raise ConfigError(
                f"expected batch_size >= 1, duration_s > 0, warmup_s >= 0; got "
                f"{self.batch_size}, {self.duration_s}, {self.warmup_s}"
            )


@dataclass
class LevelResult:
    concurrency: int
    batch_size: int
    requests: int  # answered without error in the measured window
    failed: int
    duration_s: float
    throughput: float  # inferences (images) per second
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    client_cpu_ms: float = 0.0  # this process's CPU per answered request: the load's own cost
    server: dict[str, float] = field(default_factory=dict)  # µs per request, avg_batch
    errors: list[str] = field(default_factory=list)  # the first few distinct ones
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # every answered request

    def row(self) -> dict[str, object]:
        out = {
            k: round(v, 3) if isinstance(v, float) else v
            for k, v in asdict(self).items()
            if k not in ("server", "errors", "latencies_ms")
        }
        out.update({f"server_{k}": round(v, 1) for k, v in self.server.items()})
        return out


def make_input(spec: ModelSpec, accepts_bytes: bool, source: str, batch: int) -> np.ndarray:
    """One request's input: encoded images (BYTES [b, 1]) or preprocessed FP32 tensors."""
    if source == "random":
        rng = np.random.default_rng(0)
        shape = (spec.image_size, spec.image_size) + ((spec.channels,) if spec.channels > 1 else ())
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        path = Path(source)
        if accepts_bytes:
            if not path.is_file():
                raise ConfigError(f"--input {path}: no such file")
            return bytes_batch([path.read_bytes()] * batch)
        image = read_image(path)
    if accepts_bytes:
        return bytes_batch([png_bytes(image)] * batch)
    return np.ascontiguousarray(np.repeat(spec.preprocess(image[None]), batch, axis=0))


def _totals(stats: dict) -> Counter:
    out: Counter = Counter()
    for m in stats.get("model_stats", []):
        inference = m.get("inference_stats", {})
        out["success"] += int(inference.get("success", {}).get("count", 0))
        for key in SPLIT:
            out[key] += int(inference.get(key, {}).get("ns", 0))
            out[f"{key}_count"] += int(inference.get(key, {}).get("count", 0))
        out["inference_count"] += int(m.get("inference_count", 0))
        out["execution_count"] += int(m.get("execution_count", 0))
    return out


async def _server_totals(client: AsyncTritonClassifier, models: list[str]) -> dict[str, Counter]:
    return {m: _totals(await client.statistics(m)) for m in models}


def server_split(before: dict[str, Counter], after: dict[str, Counter], tensor_model: str):
    """Mean µs of each phase per request as Triton counts it (a request in a batch is charged
    the whole batch's time, as perf_analyzer shows it), summed over the models; and the
    classifier's mean batch size."""
    split = dict.fromkeys(SPLIT, 0.0)
    for model in after:
        delta = after[model] - before[model]
        for key in SPLIT:
            if delta[f"{key}_count"]:
                split[key] += delta[key] / delta[f"{key}_count"] / 1e3
    d = after[tensor_model] - before[tensor_model]
    split = {f"{k}_us": v for k, v in split.items()}
    split["avg_batch"] = d["inference_count"] / d["execution_count"] if d["execution_count"] else 0
    return split


async def _load(senders: list, seconds: float, n: int) -> tuple[list[float], list[str], float]:
    """``n`` closed-loop workers, worker i calling ``senders[i]()``, for ``seconds``."""
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    stop_at = start + seconds

    async def worker(send) -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await send()
                latencies.append(time.perf_counter() - t0)
            except ServingError as exc:
                errors.append(str(exc))

    await asyncio.gather(*(worker(senders[i]) for i in range(n)))
    return latencies, errors, time.perf_counter() - start


async def _models_of(client: AsyncTritonClassifier, model: str) -> list[str]:
    config = await client.model_config(model)
    steps = config.get("ensemble_scheduling", {}).get("step", [])
    return [s["model_name"] for s in steps] or [model]


async def run_levels(opts: BenchOptions, on_level=None) -> list[LevelResult]:
    async with AsyncTritonClassifier(opts.url, opts.protocol, opts.model, opts.timeout_s) as c:
        contract = c.contract
        if opts.batch_size > contract.max_batch_size:
            raise ConfigError(
                f"--batch-size {opts.batch_size}: model {contract.model!r} takes at most "
                f"{contract.max_batch_size} per request"
            )
        array = make_input(contract.spec, contract.accepts_bytes, opts.input, opts.batch_size)
        models = await _models_of(c, contract.model)
        tensor_model = contract.tensor_model if contract.tensor_model in models else models[-1]
        async with contextlib.AsyncExitStack() as stack:
            if opts.shared_memory:
                slots = SharedMemorySlots(c, array, max(opts.concurrency))
                await stack.enter_async_context(slots)
                senders = [slots.sender(i) for i in range(max(opts.concurrency))]
            else:
                senders = [lambda: c.send(array)] * max(opts.concurrency)
            return await _levels(c, opts, senders, models, tensor_model, on_level)


async def _levels(c, opts: BenchOptions, senders, models, tensor_model, on_level):
    results = []
    for n in opts.concurrency:
        if opts.warmup_s:
            await _load(senders, opts.warmup_s, n)
        before = await _server_totals(c, models)
        cpu = time.process_time()
        latencies, errors, seconds = await _load(senders, opts.duration_s, n)
        cpu = time.process_time() - cpu
        after = await _server_totals(c, models)
        ms = np.percentile(np.array(latencies) * 1e3, [50, 90, 95, 99]) if latencies else [0] * 4
        result = LevelResult(
            concurrency=n,
            batch_size=opts.batch_size,
            requests=len(latencies),
            failed=len(errors),
            duration_s=round(seconds, 3),
            throughput=len(latencies) * opts.batch_size / seconds,
            p50_ms=float(ms[0]),
            p90_ms=float(ms[1]),
            p95_ms=float(ms[2]),
            p99_ms=float(ms[3]),
            client_cpu_ms=cpu * 1e3 / max(1, len(latencies)),
            server=server_split(before, after, tensor_model),
            errors=sorted(set(errors))[:3],
            latencies_ms=[t * 1e3 for t in latencies],
        )
        results.append(result)
        if on_level is not None:
            on_level(result)
    return results


def run_bench(opts: BenchOptions, on_level=None) -> list[LevelResult]:
    """Every concurrency level of ``opts``, in order (one event loop, one connection)."""
    return asyncio.run(run_levels(opts, on_level))


def describe(r: LevelResult) -> str:
    s = r.server
    return (
        f"concurrency {r.concurrency:>3}: {r.throughput:8.1f} infer/s  latency p50 "
        f"{r.p50_ms:6.2f}  p90 {r.p90_ms:6.2f}  p95 {r.p95_ms:6.2f}  p99 {r.p99_ms:6.2f} ms  "
        f"server queue {s.get('queue_us', 0):7.0f}  input {s.get('compute_input_us', 0):5.0f}  "
        f"infer {s.get('compute_infer_us', 0):7.0f}  output {s.get('compute_output_us', 0):5.0f}"
        f" us  batch {s.get('avg_batch', 0):4.1f}  client CPU {r.client_cpu_ms:5.2f} ms"
        + (f"  FAILED {r.failed}" if r.failed else "")
    )


def write_csv(results: list[LevelResult], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in results]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_curve(results: list[LevelResult], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [r.throughput for r in results]
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
        ax.plot(x, [getattr(r, key) for r in results], style, label=key.replace("_ms", ""))
    for r in results:
        ax.annotate(
            f"c={r.concurrency}",
            (r.throughput, r.p99_ms),
            fontsize=7,
            textcoords="offset points",
            xytext=(3, 3),
        )
    ax.set(xlabel="throughput (inferences/s)", ylabel="latency (ms)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
