"""Served against in-process against naive: one exported DenseNet-121, three ways, one run.

(a) ONNX Runtime in this process at its best batch size (a sweep), plus batch-1 latency;
(b) our Triton server (the embedded ``tritonserver``, started here on free loopback ports)
    with single-image requests to the classifier ``NAME_onnx`` (preprocessed float
    tensors: the same work as (a)) at concurrency 16 for throughput and at concurrency 1
    for p99, load from :func:`serving.bench.run_bench`;
(c) a naive baseline: FastAPI + PyTorch eager, one request one forward pass
    (``benchmarks/naive_server.py``, its own uvicorn process stopped by its PID), driven
    by an asyncio aiohttp client with the same concurrency and duration as (b).

After the batch-size sweep both servers stay up and ``--rounds`` rounds run every path
back to back, so noise from other people's work hits them alike; each measurement
records how many cores processes outside this benchmark kept busy meanwhile, and the
ratios are the medians over the rounds where that stayed under ``--quiet-cpu`` (all
rounds when none did). (a') -- one-thread sessions side by side in process, what two
one-thread Triton instances do -- is printed for information. Prints a table, the
ratios b/a (target >= 0.90), b/c (target >= 3) and p99 at concurrency 1 through Triton
against in-process batch-1 p99 (target <= 1.5), and as its last line
``served/inprocess=R1 served/naive=R2 p99c1/inprocess_b1=R3``. Results go to
``benchmarks/results/serving.{json,md}``; one row per run is appended to ``serving.csv``.

With no ``--model-repository`` the model is made here through the real code path:
DenseNet-121 for the data set's spec, a few training steps of ``training.loop.run_epoch``
(``--train-steps 0`` skips them: speed does not depend on weight values),
``serving.export.export_onnx`` and ``serving.repository.write_model_set`` into a
temporary directory, with the repository options below (defaults from
``benchmarks/serving_sweep.py``)::

    python benchmarks/serving.py --data-dir ../shared/data
    python benchmarks/serving.py --data-dir ../shared/data --model-repository model_repository \
        --weights model.pt --protocol http --duration-s 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAIVE_SERVER = Path(__file__).resolve().parent / "naive_server.py"
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
TARGETS = {"served/inprocess": 0.90, "served/naive": 3.0, "p99c1/inprocess_b1": 1.5}
# Repository options this script writes when it makes the model, chosen from
# benchmarks/serving_sweep.py on the 2-core machine (benchmarks/results/serving_sweep.md):
# two instances of one ONNX Runtime thread each beat one instance of two threads (two
# single-thread sessions side by side scale better than one session's intra-op pool, and
# one instance's Python/IPC work overlaps the other's compute); no queue delay keeps
# concurrency-1 latency at the in-process one, and at concurrency 16 the queue fills anyway.
DEFAULT_REPOSITORY = {
    "max_queue_delay_us": 0,
    "preferred_batch_sizes": (),
    "instances": 2,
    "intra_op_threads": 1,
    "max_batch_size": 32,
}


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


@dataclass
class Prepared:
    """The model under test: a Triton repository, its classifier and matching weights."""

    repository: Path
    classifier: str  # NAME_onnx
    spec: object  # training.spec.ModelSpec
    onnx_path: Path
    weights: Path
    notes: list[str]


class BenchError(Exception):
    """A problem the user can act on (missing data, bad options, a server that died)."""


# ---------------------------------------------------------------- model preparation


def check_data(dataset: str, data_dir: str) -> None:
    """Fail early, naming the file, when a MedMNIST data set is not in ``data_dir``."""
    from training.data import FILE_DATASETS, npz_path

    if dataset.lower() in FILE_DATASETS:
        if not Path(data_dir).is_dir():
            raise BenchError(f"--data-dir {data_dir} is not a directory")
        return
    path = npz_path(dataset, data_dir)
    if not path.is_file():
        raise BenchError(
            f"data file {path} not found: pass --data-dir with the folder holding "
            f"{path.name} (e.g. ../shared/data)"
        )


def train_briefly(spec, dataset: str, data_dir: str, steps: int, batch_size: int):
    """DenseNet-121 for ``spec``, trained ``steps`` steps with the plain loop of
    ``training.loop`` (one epoch over ``steps * batch_size`` samples); 0 steps: initial weights."""
    import torch
    from torch.utils.data import DataLoader

    from training.augment import BatchTransform
    from training.config import TrainConfig
    from training.data import DataOptions, open_split
    from training.loop import make_loss, make_optimizer, make_sampler, run_epoch
    from training.model import build_model

    torch.manual_seed(0)
    model = build_model(spec.channels, spec.num_classes)
    if steps <= 0:
        return model
    cfg = TrainConfig(
        dataset=dataset,
        data_dir=data_dir,
        image_size=spec.image_size,
        epochs=1,
        batch_size=batch_size,
        max_train_samples=steps * batch_size,
    )
    train = open_split(
        DataOptions.from_config(cfg),
        "train",
        image_size=spec.image_size,
        channels=spec.channels,
        max_samples=cfg.max_train_samples,
    )
    sampler = make_sampler(cfg, train.labels, train, 0, 1)
    loader = DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=True)
    transform = BatchTransform(cfg.augmentations, cfg.aug_strength, spec.mean, spec.std)
    stats = run_epoch(
        model,
        loader,
        transform=lambda x: transform(x, train=True),
        loss_fn=make_loss(cfg, spec, train.labels),
        optimizer=make_optimizer(cfg, model.parameters()),
        spec=spec,
        device=torch.device("cpu"),
    )
    print(
        f"trained {stats.images} images in {stats.seconds:.1f} s "
        f"(loss {stats.loss_sum / max(1, stats.images):.3f})",
        flush=True,
    )
    return model


def repository_options(args: argparse.Namespace):
    """``RepositoryOptions`` from the command line, over this script's defaults."""
    from serving.repository import RepositoryOptions

    return RepositoryOptions(
        max_batch_size=args.max_batch_size,
        preferred_batch_sizes=tuple(args.preferred_batch_sizes),
        max_queue_delay_us=args.max_queue_delay_us,
        instance_count=args.instances,
        intra_op_threads=args.intra_op_threads,
    )


def make_model(args: argparse.Namespace, workdir: Path, images: np.ndarray) -> Prepared:
    """Build, briefly train, export, check and write the repository under ``workdir``."""
    from serving.export import PARITY_ATOL, export_onnx, parity
    from serving.model_configs import classifier_name
    from serving.repository import write_model_set
    from training.model import ProbabilityHead, save_weights

    spec = model_spec(args)
    model = train_briefly(spec, args.dataset, args.data_dir, args.train_steps, 32)
    notes = []
    if args.train_steps <= 0:
        notes.append("--train-steps 0: initial weights (speed does not depend on weight values)")
    head = ProbabilityHead(model, spec.multi_label).eval()
    started = time.perf_counter()
    onnx_path = export_onnx(head, spec, workdir / "model.onnx", max_batch_size=max(BATCH_SIZES))
    diff = parity(head, onnx_path, images, (1, 7))
    if not diff <= PARITY_ATOL:
        raise BenchError(f"ONNX Runtime differs from PyTorch by {diff:.3g} (max abs)")
    print(f"exported ONNX in {time.perf_counter() - started:.0f} s (parity {diff:.1e})", flush=True)
    options = repository_options(args)
    models = write_model_set(workdir / "repository", spec, onnx_path, options)
    weights = workdir / "weights.pt"
    save_weights(model, weights, spec.to_json())
    notes.append(f"repository options: {options_summary(options)}")
    return Prepared(
        repository=workdir / "repository",
        classifier=classifier_name(spec),
        spec=spec,
        onnx_path=models.classifier / str(models.version) / onnx_path.name,
        weights=weights,
        notes=notes,
    )


def model_spec(args: argparse.Namespace):
    from training.spec import ModelSpec

    return ModelSpec.for_dataset(args.dataset, args.image_size, data_dir=args.data_dir)


def options_summary(options) -> str:
    sizes = ",".join(map(str, options.preferred_batch_sizes)) or "none"
    return (
        f"max_queue_delay_us={options.max_queue_delay_us} preferred={sizes} "
        f"instances={options.instance_count} intra_op_threads={options.intra_op_threads} "
        f"max_batch_size={options.max_batch_size}"
    )


def find_classifier(repository: Path, model: str) -> tuple[str, object, Path]:
    """(classifier name, spec, ONNX file of its latest version) in a CPU repository."""
    from serving.repository import list_models, read_config, spec_from_config

    names = [
        n
        for n in list_models(repository)
        if read_config(repository / n).backend == "python"
        and "onnx_file" in read_config(repository / n).parameters
    ]
    if model:
        names = [n for n in names if n in (model, f"{model}_onnx")]
    if len(names) != 1:
        raise BenchError(
            f"{repository}: expected one ONNX classifier (python backend with onnx_file)"
            f"{' named ' + model if model else ''}, found {names or 'none'}; pass --model NAME"
        )
    config = read_config(repository / names[0])
    onnx_file = config.parameters["onnx_file"].string_value
    versions = sorted(
        (p for p in (repository / names[0]).iterdir() if p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    files = [v / onnx_file for v in versions if (v / onnx_file).is_file()]
    if not files:
        raise BenchError(f"{repository / names[0]}: no version holds {onnx_file}")
    return names[0], spec_from_config(config), files[-1]


def reuse_model(args: argparse.Namespace, workdir: Path) -> Prepared:
    """The given repository; weights from ``--weights``, else initial ones saved here."""
    from training.model import build_model, load_weights, save_weights

    repository = Path(args.model_repository)
    if not repository.is_dir():
        raise BenchError(f"--model-repository {repository} is not a directory")
    name, spec, onnx_path = find_classifier(repository, args.model)
    notes = [f"repository {repository} as written (its own batching and instance settings)"]
    if args.weights:
        weights = Path(args.weights)
        if not weights.is_file():
            raise BenchError(f"--weights {weights} does not exist")
        state, _ = load_weights(weights)
        model = build_model(spec.channels, spec.num_classes)
        model.load_state_dict(state)  # fails loudly when the architecture differs
    else:
        import torch

        torch.manual_seed(0)
        model = build_model(spec.channels, spec.num_classes)
        weights = workdir / "weights.pt"
        save_weights(model, weights, spec.to_json())
        notes.append(
            "naive baseline: no --weights, so the same architecture with initial weights "
            "(speed does not depend on weight values)"
        )
    return Prepared(repository, name, spec, onnx_path, weights, notes)


def sample_images(spec, dataset: str, data_dir: str, count: int) -> np.ndarray:
    """``count`` real validation images, preprocessed (repeated if the split is smaller)."""
    from training.data import prepare_split

    split = prepare_split(
        dataset,
        "val",
        data_dir,
        image_size=spec.image_size,
        max_samples=count,
        mean=spec.mean,
        std=spec.std,
    )
    reps = -(-count // len(split.x))
    return np.ascontiguousarray(np.concatenate([split.x] * reps)[:count], dtype=np.float32)


# ---------------------------------------------------------------- noise


def _busy_jiffies() -> int:
    """CPU time (clock ticks) every process on the machine has used since boot."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, fh.readline().split()[1:9]
        )
    return user + nice + system + irq + softirq + steal


def _tree_jiffies(root: int) -> int:
    """CPU time (clock ticks) of ``root`` and all its live descendants."""
    parent, used = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as fh:
                fields_ = fh.read().rsplit(")", 1)[1].split()
            parent[int(entry)] = int(fields_[1])
            used[int(entry)] = int(fields_[11]) + int(fields_[12])  # utime + stime
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
        start = (time.perf_counter(), _busy_jiffies(), _tree_jiffies(os.getpid()))
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
            ours = _tree_jiffies(os.getpid()) - start[2]
            out.append(max(0.0, (busy - ours) / os.sysconf("SC_CLK_TCK") / elapsed))


def measured(fn: Callable[..., PathResult], *args) -> PathResult:
    """``fn(*args)`` with the others' CPU during it recorded on the row."""
    with others_cpu() as cpu:
        row = fn(*args)
    row.others_cpu = cpu[0]
    return row


# ---------------------------------------------------------------- (a) in process


def ort_session(onnx_path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def ort_throughput(session, images: np.ndarray, batch: int, seconds: float) -> float:
    """Images/s of back-to-back ``session.run`` at ``batch`` for about ``seconds``."""
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(images[:batch])
    session.run(None, {name: x})  # warm-up (allocations for this shape)
    runs, started = 0, time.perf_counter()
    while True:
        session.run(None, {name: x})
        runs += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and runs >= 3:
            return runs * batch / elapsed


def ort_latencies(session, images: np.ndarray, runs: int) -> np.ndarray:
    """Seconds of each of ``runs`` batch-1 runs, cycling over the images."""
    name = session.get_inputs()[0].name
    for i in range(10):
        session.run(None, {name: images[i : i + 1]})
    out = np.empty(runs)
    for i in range(runs):
        x = images[i % len(images)][None]
        started = time.perf_counter()
        session.run(None, {name: x})
        out[i] = time.perf_counter() - started
    return out


def inprocess_sweep(
    session, images: np.ndarray, batches: tuple[int, ...], seconds: float
) -> list[PathResult]:
    """Throughput at every batch size that runs (a reused model may bound the batch)."""
    rows = []
    for batch in batches:
        try:
            rate = ort_throughput(session, images, batch, seconds)
        except Exception as exc:  # e.g. a model exported with a smaller batch bound
            print(f"  in process batch {batch}: skipped ({type(exc).__name__})", flush=True)
            continue
        print(f"  in process batch {batch:3d}: {rate:7.1f} img/s", flush=True)
        rows.append(PathResult("inprocess", f"ORT in process b{batch}", 0, batch, rate, 0, 0, 0))
    return rows


def inprocess_best(session, images: np.ndarray, batch: int, seconds: float) -> PathResult:
    rate = ort_throughput(session, images, batch, seconds)
    label = f"(a) ORT in process, best batch {batch}"
    return PathResult("inprocess", label, 0, batch, rate, 0, 0, 0)


def inprocess_parallel(
    sessions: list, images: np.ndarray, batch: int, seconds: float
) -> PathResult:
    """One-thread sessions run side by side, one Python thread each (ONNX Runtime releases
    the GIL): what two Triton instances of one intra-op thread do. For information."""
    rates = [0.0] * len(sessions)

    def work(i: int) -> None:
        rates[i] = ort_throughput(sessions[i], images, batch, seconds)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    label = f"(a') ORT in process, {len(sessions)} x 1-thread sessions, batch {batch}"
    return PathResult("inprocess", label, 0, batch, sum(rates), 0, 0, 0)


def inprocess_latency(session, images: np.ndarray, runs: int) -> PathResult:
    """Batch-1 latency of ``runs`` back-to-back runs."""
    ms = ort_latencies(session, images, runs) * 1000
    return PathResult(
        "inprocess",
        "(a) ORT in process, batch 1",
        1,
        1,
        1000 / float(ms.mean()),
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        runs,
    )


# ---------------------------------------------------------------- (b) Triton


@contextlib.contextmanager
def triton_server(repository: Path, protocol: str) -> Iterator[str]:
    """tritonserver on free loopback ports over ``repository``; yields the URL of
    ``protocol`` (``host:port``) and stops the server when done."""
    from serving.server import TritonServer, find_free_port

    ports = free_ports(3, find_free_port)
    server = TritonServer(repository, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2])
    with server:
        url = server.grpc_url if protocol == "grpc" else f"127.0.0.1:{ports[0]}"
        print(f"  tritonserver pid {server.pid} ready at {url} ({protocol})", flush=True)
        yield url


def triton_level(url: str, model: str, args: argparse.Namespace, concurrency: int) -> PathResult:
    """One :func:`serving.bench.run_bench` level: single-image requests of random
    preprocessed tensors to the classifier ``model``."""
    from serving.bench import BenchOptions, run_bench

    (r,) = run_bench(
        BenchOptions(
            url=url,
            protocol=args.protocol,
            model=model,
            concurrency=(concurrency,),
            batch_size=1,
            duration_s=args.duration_s,
            warmup_s=args.warmup_s,
            input="random",
        )
    )
    return PathResult(
        "triton",
        f"(b) Triton {args.protocol}, {model}",
        r.concurrency,
        1,
        float(r.throughput),
        float(r.p50_ms),
        float(r.p99_ms),
        int(r.requests),
        int(r.failed),
        {k: float(v) for k, v in dict(r.server or {}).items()},
    )


def free_ports(count: int, pick: Callable[[], int]) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = pick()
        if port not in ports:
            ports.append(port)
    return ports


# ---------------------------------------------------------------- (c) naive baseline


def start_naive(weights: Path, port: int, log_path: Path) -> subprocess.Popen:
    """``naive_server.py`` as its own process on 127.0.0.1:``port``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, str(NAIVE_SERVER), "--weights", str(weights), "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_http_ok(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"naive server exited with code {process.returncode}:\n{tail}")
        with contextlib.suppress(OSError), opener.open(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise BenchError(f"naive server not answering {url} after {timeout:.0f} s (log {log_path})")


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process we started (by its PID), SIGKILL after ``timeout`` s."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def naive_server(weights: Path, workdir: Path) -> Iterator[str]:
    """The naive server on a free loopback port; yields its base URL, stops it by PID."""
    from serving.server import find_free_port

    port = find_free_port()
    log_path = workdir / "naive_server.log"
    process = start_naive(weights, port, log_path)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/health", process, log_path, timeout=180)
        print(f"  naive server pid {process.pid} ready at {base}", flush=True)
        yield base
    finally:
        stop_process(process)


async def _post_loop(
    session, url: str, body: bytes, concurrency: int, seconds: float
) -> tuple[list[float], int, float]:
    """``concurrency`` closed-loop tasks POSTing ``body`` back to back for ``seconds``:
    latencies (s) of the answered requests, how many failed, and the elapsed time."""
    import aiohttp

    latencies: list[float] = []
    failed = 0
    started = time.perf_counter()
    stop_at = started + seconds

    async def worker() -> None:
        nonlocal failed
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body) as response:
                    payload = await response.json()
                    ok = response.status == 200 and "probabilities" in payload
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failed, time.perf_counter() - started


async def http_load(
    url: str, body: bytes, concurrency: int, duration_s: float, warmup_s: float
) -> tuple[list[float], int, float]:
    """The naive server's load, measured as :func:`serving.bench.run_bench` measures
    Triton: ``warmup_s`` unmeasured, then ``duration_s`` measured, one connection per task."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/octet-stream"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        if warmup_s:
            await _post_loop(session, url, body, concurrency, warmup_s)
        return await _post_loop(session, url, body, concurrency, duration_s)


def naive_level(base: str, image: np.ndarray, args: argparse.Namespace) -> PathResult:
    """``--concurrency`` aiohttp tasks against the naive server for ``--duration-s``."""
    body = np.ascontiguousarray(image[None], dtype=np.float32).tobytes()
    latencies, failed, elapsed = asyncio.run(
        http_load(f"{base}/predict", body, args.concurrency, args.duration_s, args.warmup_s)
    )
    if not latencies:
        raise BenchError(f"the naive server at {base} answered no request ({failed} failed)")
    ms = np.asarray(latencies) * 1000
    return PathResult(
        "naive",
        "(c) FastAPI + PyTorch eager",
        args.concurrency,
        1,
        len(latencies) / elapsed,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        len(latencies),
        failed,
    )


# ---------------------------------------------------------------- rounds


@dataclass
class Round:
    """One pass over every path, back to back, so machine noise hits them alike."""

    inprocess: PathResult  # best batch
    inprocess_b1: PathResult
    served: PathResult  # concurrency N
    served_c1: PathResult
    naive: PathResult
    inprocess_parallel: PathResult  # information: not in the ratios

    def rows(self) -> list[PathResult]:
        return [
            self.inprocess,
            self.inprocess_parallel,
            self.served,
            self.naive,
            self.inprocess_b1,
            self.served_c1,
        ]

    def others_cpu(self) -> float:
        """The most CPU other processes took during any of this round's measurements."""
        return max(r.others_cpu for r in self.rows())

    def parallel_ratio(self) -> float:
        return self.served.throughput / self.inprocess_parallel.throughput

    def ratios(self) -> dict[str, float]:
        return {
            "served/inprocess": self.served.throughput / self.inprocess.throughput,
            "served/naive": self.served.throughput / self.naive.throughput,
            "p99c1/inprocess_b1": self.served_c1.p99_ms / self.inprocess_b1.p99_ms,
        }


def measure_round(
    sessions: tuple, images: np.ndarray, best: int, urls: tuple[str, str], model: str, args
) -> Round:
    """(a) best batch, (a') parallel one-thread sessions, (b) concurrency N, (c) concurrency
    N, (a) batch 1, (b) concurrency 1."""
    (session, singles), (triton_url, naive_url) = sessions, urls
    inprocess = measured(inprocess_best, session, images, best, args.sweep_s)
    parallel = measured(inprocess_parallel, singles, images, best, args.sweep_s)
    served = measured(triton_level, triton_url, model, args, args.concurrency)
    naive = measured(naive_level, naive_url, images[0], args)
    b1 = measured(inprocess_latency, session, images, args.latency_runs)
    c1 = measured(triton_level, triton_url, model, args, 1)
    return Round(inprocess, b1, served, c1, naive, parallel)


def median_row(rows: list[PathResult]) -> PathResult:
    """Median throughput and latencies over rounds; requests and failures summed."""
    first = rows[0]
    med = lambda key: float(np.median([getattr(r, key) for r in rows]))  # noqa: E731
    extra = {k: float(np.median([r.extra.get(k, 0.0) for r in rows])) for k in first.extra}
    return PathResult(
        first.path,
        first.label,
        first.concurrency,
        first.batch_size,
        med("throughput"),
        med("p50_ms"),
        med("p99_ms"),
        sum(r.requests for r in rows),
        sum(r.failed for r in rows),
        extra,
        med("others_cpu"),
    )


def summary_rows(rounds: list[Round]) -> list[PathResult]:
    fields_ = ("inprocess_b1", "inprocess", "inprocess_parallel", "served_c1", "served", "naive")
    return [median_row([getattr(r, f) for r in rounds]) for f in fields_]


def quiet_rounds(rounds: list[Round], threshold: float) -> list[Round]:
    """The rounds in which other processes never took more than ``threshold`` cores;
    all rounds when none was that quiet."""
    quiet = [r for r in rounds if r.others_cpu() <= threshold]
    return quiet or rounds


def median_ratios(rounds: list[Round]) -> dict[str, float]:
    per_round = [r.ratios() for r in rounds]
    return {k: float(np.median([p[k] for p in per_round])) for k in TARGETS}


# ---------------------------------------------------------------- report


def row_text(row: PathResult) -> str:
    conc = str(row.concurrency) if row.concurrency else "-"
    lat = f"{row.p50_ms:7.2f} {row.p99_ms:7.2f}" if row.p50_ms else f"{'-':>7} {'-':>7}"
    server = ""
    if row.extra:
        server = (
            f"  server: queue {row.extra.get('queue_us', 0) / 1000:.2f} ms, "
            f"infer {row.extra.get('compute_infer_us', 0) / 1000:.2f} ms, "
            f"batch {row.extra.get('avg_batch', 0):.1f}"
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


def write_results(out_dir: Path, report: dict, text: str) -> None:
    """``serving.json`` and ``serving.md`` (this run), one row appended to ``serving.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "serving.md").write_text(text)
    path = out_dir / "serving.csv"
    row = {
        "time": report["time"],
        "protocol": report["options"]["protocol"],
        "concurrency": report["options"]["concurrency"],
        "duration_s": report["options"]["duration_s"],
        "repository": report["repository_options"],
        **{k: f"{v:.3f}" for k, v in report["ratios"].items()},
        "load_before": report["load_average"][0],
        "load_after": report["load_average"][1],
    }
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def markdown(report: dict, rows: list[PathResult], lines: list[str]) -> str:
    body = [
        f"# benchmarks/serving.py — {report['time']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}; load average before/after "
        f"{report['load_average'][0]:.2f} / {report['load_average'][1]:.2f}",
        "",
        *(f"- {note}" for note in report["notes"]),
        "",
        "| path | concurrency | batch | img/s | p50 ms | p99 ms | others' CPU | "
        "server queue / infer ms, batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        server = (
            f"{r.extra.get('queue_us', 0) / 1000:.2f} / "
            f"{r.extra.get('compute_infer_us', 0) / 1000:.2f}, {r.extra.get('avg_batch', 0):.1f}"
            if r.extra
            else ""
        )
        lat = (f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}") if r.p50_ms else ("", "")
        body.append(
            f"| {r.label} | {r.concurrency or ''} | {r.batch_size} | {r.throughput:.1f} | "
            f"{lat[0]} | {lat[1]} | {r.others_cpu:.2f} | {server} |"
        )
    return "\n".join([*body, "", "```", *lines, "```", ""])


# ---------------------------------------------------------------- command line


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="pneumoniamnist")
    p.add_argument("--data-dir", default="", help="folder holding <dataset>.npz")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model-repository", default="", help="reuse this repository")
    p.add_argument("--model", default="", help="classifier in --model-repository (NAME)")
    p.add_argument("--weights", default="", help="save_weights file for the naive baseline")
    p.add_argument("--train-steps", type=int, default=8, help="batch-32 steps; 0: no training")
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--batch-sizes", type=parse_sizes, default=BATCH_SIZES, help="in-process sweep")
    p.add_argument("--sweep-s", type=float, default=2.0, help="seconds per in-process size")
    p.add_argument("--latency-runs", type=int, default=500, help="in-process batch-1 runs")
    p.add_argument("--rounds", type=int, default=4, help="rounds over (a), (b), (c)")
    p.add_argument(
        "--quiet-cpu",
        type=float,
        default=0.2,
        help="ratios from the rounds in which other processes took at most this many cores",
    )
    repo = p.add_argument_group("repository options (when this script writes the repository)")
    repo.add_argument("--max-queue-delay-us", type=int)
    repo.add_argument("--preferred-batch-sizes", type=parse_sizes)
    repo.add_argument("--instances", type=int)
    repo.add_argument("--intra-op-threads", type=int)
    repo.add_argument("--max-batch-size", type=int)
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    given = [k for k in DEFAULT_REPOSITORY if getattr(args, k) is not None]
    if args.model_repository and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        p.error(
            f"{flags}: only apply when this script writes the repository (no --model-repository)"
        )
    for key, value in DEFAULT_REPOSITORY.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.weights and not args.model_repository:
        p.error("--weights: only with --model-repository (otherwise the model is made here)")
    if args.concurrency < 1 or args.rounds < 1 or args.duration_s <= 0 or args.warmup_s < 0:
        p.error("--concurrency and --rounds must be >= 1, --duration-s > 0, --warmup-s >= 0")
    if not args.data_dir:
        from training.config import default_data_dir

        args.data_dir = default_data_dir()
    return args


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[Prepared, np.ndarray]:
    """The model under test and real preprocessed images for the in-process runs."""
    check_data(args.dataset, args.data_dir)
    print("preparing the model", flush=True)
    count = max(args.batch_sizes)
    if args.model_repository:
        prepared = reuse_model(args, workdir)
        return prepared, sample_images(prepared.spec, args.dataset, args.data_dir, count)
    images = sample_images(model_spec(args), args.dataset, args.data_dir, count)
    return make_model(args, workdir, images), images


def run_rounds(
    prepared: Prepared, images: np.ndarray, best: int, args: argparse.Namespace, workdir: Path
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
        for i in range(1, args.rounds + 1):
            print(f"round {i}/{args.rounds}", flush=True)
            one = measure_round(
                sessions, images, best, (triton_url, naive_url), prepared.classifier, args
            )
            for row in one.rows():
                print(f"  {row_text(row)}", flush=True)
            print(f"  {last_line(one.ratios())} (others' CPU {one.others_cpu():.2f})", flush=True)
            rounds.append(one)
    return rounds


def run(args: argparse.Namespace, workdir: Path) -> dict:
    """Prepare the model, sweep (a), then rounds of (a), (b), (c); table, ratios, report."""
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
        f"(a) best batch {best}; rounds of (a), (b) Triton {args.protocol}, (c) naive", flush=True
    )
    rounds = run_rounds(prepared, images, best, args, workdir)
    used = quiet_rounds(rounds, args.quiet_cpu)
    rows = summary_rows(used)
    values = median_ratios(used)
    which = (
        f"the {len(used)} of {len(rounds)} rounds in which other processes took at most "
        f"{args.quiet_cpu} cores"
        if len(used) < len(rounds) or all(r.others_cpu() <= args.quiet_cpu for r in rounds)
        else f"all {len(rounds)} rounds (none had other processes at <= {args.quiet_cpu} cores)"
    )
    lines = [
        f"medians over {which}; ratios are the medians of the per-round ratios",
        table(rows),
        "",
        *ratio_lines(values),
        f"{'served/inprocess_par':<20} "
        f"{float(np.median([r.parallel_ratio() for r in used])):6.3f}  (information: against "
        "(a'), one-thread sessions side by side, no target)",
    ]
    print("\n" + "\n".join(lines), flush=True)
    report = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}",
        "load_average": [load_before, os.getloadavg()[0]],
        "options": vars(args),
        "repository_options": ""
        if args.model_repository
        else options_summary(repository_options(args)),
        "notes": prepared.notes,
        "inprocess_sweep": [asdict(r) for r in sweep],
        "rows": [asdict(r) for r in rows],
        "rounds": [
            {**asdict(r), "ratios": r.ratios(), "quiet": r in used, "others_cpu": r.others_cpu()}
            for r in rounds
        ],
        "ratios": values,
        "last_line": last_line(values),
    }
    out_dir = Path(args.results_dir)
    write_results(out_dir, report, markdown(report, rows, [*lines, last_line(values)]))
    print(f"results: {out_dir}/serving.{{json,md,csv}}", flush=True)
    print(last_line(values), flush=True)
    return report


def unshadow_serving_package() -> None:
    """Run as ``python benchmarks/serving.py``, this file's folder comes first on
    ``sys.path`` and this module would hide the ``serving`` package: drop that entry."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]


def main(argv: list[str] | None = None) -> int:
    unshadow_serving_package()
    args = parse_args(argv)
    from training.errors import MedimgError

    with tempfile.TemporaryDirectory(prefix="medimg-serving-bench-") as tmp:
        try:
            run(args, Path(tmp))
        except (BenchError, MedimgError) as exc:
            print(f"serving benchmark: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
