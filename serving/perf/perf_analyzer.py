"""perf_analyzer, NVIDIA's load generator for Triton, as the load of (b) in the side-by-side
serving benchmark (``benchmarks/serving_side_by_side.py``).

The ``tritonclient`` wheels of releases 2.2x-2.6x carry a ``perf_analyzer`` binary
(``tritonclient-V.data/data/bin/perf_analyzer``). 2.48.0 is a release whose binary runs on
glibc 2.36 (Debian 12; 2.52 and later need 2.38). It links ``libb64.so.0d`` and
``libcudart.so.12`` (loaded, never used without a GPU), both of which the nvidia-pytriton
wheel bundles for its tritonserver (``nvidia_pytriton.libs``, under hashed names).

:func:`locate` finds a binary in this order: an explicit path (``--perf-analyzer``), a
``perf_analyzer`` on ``PATH``, medimg's tool cache (``serving.server.home.cache_dir()``/
``perf_analyzer-V``); else it fetches the wheel with ``pip download`` (the package
registry) into that cache, extracts the binary and copies the two libraries beside it.
:func:`pa_level` runs one concurrency level and returns a row of the table: throughput
from perf_analyzer's CSV, every request's latency from its profile export (for pooled
percentiles), the server-side split, the average batch from Triton's statistics and
perf_analyzer's own CPU per request::

    python serving/perf/perf_analyzer.py          # fetch if needed, print its version
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.perf.accounting import BenchError, PathResult

VERSION = "2.48.0"
LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict

    def version(self) -> str:
        out = subprocess.run(
            [str(self.binary), "--version"], env=self.env, capture_output=True, text=True
        )
        text = (out.stdout + out.stderr).strip()
        if out.returncode != 0:
            raise BenchError(f"{self.binary} --version failed: {text[-500:]}")
        return text


def _cached(home: Path) -> PerfAnalyzer | None:
    binary = home / "bin" / "perf_analyzer"
    if not os.access(binary, os.X_OK) or not all((home / "lib" / n).exists() for n in LIBRARIES):
        return None
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(home / "lib"), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return PerfAnalyzer(binary, env)


def _fetch(home: Path) -> None:
    """The wheel from the package registry, its binary extracted, the two libraries copied
    beside it; built next to ``home`` and renamed into place, so a half-done fetch is
    never used."""
    from serving.server.home import wheel_paths

    _, libs = wheel_paths()
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent, prefix=".perf_analyzer-") as tmp:
        work = Path(tmp)
        print(f"  fetching perf_analyzer: pip download tritonclient=={VERSION}", flush=True)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(work)]
        out = subprocess.run([*pip, f"tritonclient=={VERSION}"], capture_output=True, text=True)
        wheels = list(work.glob(f"tritonclient-{VERSION}-*.whl"))
        if out.returncode != 0 or not wheels:
            raise BenchError(
                f"cannot fetch perf_analyzer (pip download tritonclient=={VERSION}): "
                f"{(out.stderr or out.stdout).strip()[-800:]}; give --perf-analyzer PATH or "
                "--load-generator medimg"
            )
        member = f"tritonclient-{VERSION}.data/data/bin/perf_analyzer"
        stage = work / "home"
        (stage / "bin").mkdir(parents=True)
        (stage / "lib").mkdir()
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(member) as src,
            open(stage / "bin" / "perf_analyzer", "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
        (stage / "bin" / "perf_analyzer").chmod(0o755)
        for name, pattern in LIBRARIES.items():
            found = sorted(libs.glob(pattern))
            if not found:
                raise BenchError(f"no {pattern} in {libs}: perf_analyzer needs {name}")
            shutil.copyfile(found[0], stage / "lib" / name)  # not a link: venvs come and go
        if home.exists():  # another run finished first
            return
        stage.rename(home)


def locate(explicit: str = "", cache: Path | None = None) -> PerfAnalyzer:
    """A runnable perf_analyzer (see the module docstring for the order of places)."""
    found: PerfAnalyzer | None
    if explicit:
        path = Path(explicit)
        if not os.access(path, os.X_OK):
            raise BenchError(f"--perf-analyzer {explicit}: not an executable file")
        found = PerfAnalyzer(path, dict(os.environ))
    elif shutil.which("perf_analyzer"):
        found = PerfAnalyzer(Path(shutil.which("perf_analyzer") or ""), dict(os.environ))
    else:
        from serving.server.home import cache_dir

        home = (cache or cache_dir()) / f"perf_analyzer-{VERSION}"
        found = _cached(home)
        if found is None:
            _fetch(home)
            found = _cached(home)
        if found is None:
            raise BenchError(
                f"{home}: incomplete perf_analyzer (no bin/perf_analyzer or lib/ of "
                f"{', '.join(LIBRARIES)}): remove the folder to fetch it again"
            )
    found.version()  # fails here, with its message, if it cannot run
    return found


def write_input(images: np.ndarray, input_name: str, path: Path) -> Path:
    """perf_analyzer's ``--input-data`` JSON: one batch-1 request per image, the raw
    float32 bytes base64-encoded, so it sends the images that (a) runs on."""
    data = [
        {
            input_name: {
                "b64": base64.b64encode(np.ascontiguousarray(x, np.float32).tobytes()).decode()
            }
        }
        for x in images
    ]
    path.write_text(json.dumps({"data": data}))
    return path


def latencies_ms(profile: Path) -> list[float]:
    """Every request's latency from perf_analyzer's profile export (nanosecond stamps).

    Not parsed as JSON: the export writes the raw output bytes into its strings, so it is
    not valid JSON (nor UTF-8). The two stamps of every request are matched in order."""
    raw = profile.read_bytes()
    sent = [int(t) for t in re.findall(rb'[{,]"timestamp":(\d+)', raw)]
    answered = [int(t) for t in re.findall(rb'"response_timestamps":\[(\d+)', raw)]
    if len(sent) != len(answered):
        raise BenchError(
            f"{profile}: {len(sent)} request stamps but {len(answered)} response stamps"
        )
    return [(b - a) / 1e6 for a, b in zip(sent, answered, strict=True)]


def _batch_counts(url: str, protocol: str, model: str) -> tuple[int, int]:
    """``(inference_count, execution_count)`` of ``model`` from Triton's statistics."""
    if protocol == "grpc":
        import tritonclient.grpc as client
    else:
        import tritonclient.http as client
    from tritonclient.utils import InferenceServerException

    try:
        with client.InferenceServerClient(url) as c:
            stats = (
                c.get_inference_statistics(model, as_json=True)
                if protocol == "grpc"
                else c.get_inference_statistics(model)
            )
    except InferenceServerException as exc:
        raise BenchError(f"statistics of model {model!r} at {url}: {exc}") from None
    row = stats["model_stats"][0]
    return int(row.get("inference_count", 0)), int(row.get("execution_count", 0))


_SHM_LABEL = {"none": "", "system": ", system shm"}


def pa_level(
    pa: PerfAnalyzer, url: str, model: str, args, concurrency: int, input_json: Path
) -> PathResult:
    """perf_analyzer at ``concurrency`` against ``model``: three measurement windows of
    ``--duration-s``/3 each (all three count; the server is warm from earlier levels);
    with ``args.shared_memory == "system"`` the tensors go through system shared memory
    regions that perf_analyzer registers with the server and removes at its end."""
    window_ms = max(500, int(args.duration_s * 1000 / 3))
    with tempfile.TemporaryDirectory(prefix="medimg-pa-") as tmp:
        report, profile = Path(tmp) / "pa.csv", Path(tmp) / "profile.json"
        cmd = [
            str(pa.binary),
            "-m",
            model,
            "-u",
            url,
            "-i",
            args.protocol,
            "-b",
            "1",
            f"--concurrency-range={concurrency}",
            "--measurement-mode=time_windows",
            f"--measurement-interval={window_ms}",
            "--stability-percentage=999",
            "--max-trials=3",
            f"--input-data={input_json}",
            "-f",
            str(report),
            f"--profile-export-file={profile}",
        ]
        if args.shared_memory != "none":  # tensors through shared memory, not the socket
            cmd.append(f"--shared-memory={args.shared_memory}")
        before = _batch_counts(url, args.protocol, model)
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(cmd, env=pa.env, capture_output=True, text=True)
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = _batch_counts(url, args.protocol, model)
        if out.returncode != 0 or not report.exists():
            raise BenchError(
                f"perf_analyzer failed (exit {out.returncode}): "
                f"{(out.stderr or out.stdout).strip()[-1500:]}"
            )
        with open(report, newline="") as fh:
            row = next(csv.DictReader(fh))
        samples = latencies_ms(profile)
    if not samples:
        raise BenchError(f"perf_analyzer answered no request of {model} at {url}")
    spent = (cpu_after.ru_utime - cpu.ru_utime) + (cpu_after.ru_stime - cpu.ru_stime)
    inferences, executions = (a - b for a, b in zip(after, before, strict=True))
    us = lambda key: float(row.get(key) or 0)  # noqa: E731
    ms = np.asarray(samples)
    return PathResult(
        "triton",
        f"(b) Triton {args.protocol}, perf_analyzer{_SHM_LABEL[args.shared_memory]}",
        concurrency,
        1,
        float(row["Inferences/Second"]),
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        len(samples),
        0,
        {
            "queue_us": us("Server Queue"),
            "compute_input_us": us("Server Compute Input"),
            "compute_infer_us": us("Server Compute Infer"),
            "compute_output_us": us("Server Compute Output"),
            "avg_batch": inferences / executions if executions else 0.0,
            "client_cpu_ms": spent * 1e3 / len(samples),
        },
        samples_ms=samples,
    )


if __name__ == "__main__":
    try:
        found = locate(sys.argv[1] if len(sys.argv) > 1 else "")
    except BenchError as exc:
        sys.exit(f"perf_analyzer: {exc}")
    print(found.binary)
    print(found.version())
