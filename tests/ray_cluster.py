"""A real two-node Ray cluster on this machine: ``ray start --head`` and a second
``ray start --address`` with its own resources, both child processes stopped by the
PIDs this fixture holds (never ``ray stop``, which ends every Ray process by name)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["RayCluster", "ray_cluster"]


@dataclass
class RayCluster:
    address: str  # GCS address for --ray-address
    pids: tuple[
        int, ...
    ]  # the `ray start --block` processes; every node process descends from them

    def processes_titled(self, title: str) -> list[int]:
        """PIDs of this cluster's processes whose title (Ray sets ``ray::<Actor>``) starts
        with ``title``: found inside the process trees this fixture started, nowhere else."""
        import psutil

        found = []
        for pid in self.pids:
            for child in psutil.Process(pid).children(recursive=True):
                try:
                    if " ".join(child.cmdline()).startswith(title):
                        found.append(child.pid)
                except psutil.Error:
                    continue
        return found


def _ray() -> str:
    return str(Path(sys.executable).parent / "ray")


def _start(args: list[str], log: Path, temp_dir: Path) -> subprocess.Popen:
    """``ray start`` with a temp dir of its own: it writes the cluster's address to
    ``<temp dir>/ray_current_cluster``, which only ``ray stop`` clears; left in the shared
    temp dir, every later ``ray.init()`` with no address would join the dead cluster."""
    env = {**os.environ, "RAY_TMPDIR": str(temp_dir)}
    return subprocess.Popen(
        [_ray(), "start", *args, "--block"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_started(proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def _alive_nodes(address: str) -> int:
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, address], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> RayCluster:
    """Head (1 CPU) + a second node (1 CPU, custom resource ``node2``) on loopback."""
    from serving.server import find_free_port

    work = tmp_path_factory.mktemp("ray_cluster")
    port = find_free_port()
    head_log, node_log = work / "head.log", work / "node2.log"
    temp_dir = Path(tempfile.mkdtemp(prefix="medimg-ray-"))  # short: Ray's sockets live here
    head = _start(
        [
            "--head",
            "--port", str(port),
            "--node-ip-address", "127.0.0.1",
            "--num-cpus", "1",
            "--num-gpus", "0",
            "--include-dashboard", "false",
        ],
        head_log,
        temp_dir,
    )  # fmt: skip
    procs = [head]
    try:
        address = f"127.0.0.1:{port}"
        _wait_started(head, head_log)
        node = _start(
            [
                "--address", address,
                "--num-cpus", "1",
                "--num-gpus", "0",
                "--resources", '{"node2": 1}',
            ],
            node_log,
            temp_dir,
        )  # fmt: skip
        procs.append(node)
        _wait_started(node, node_log)
        assert _alive_nodes(address) == 2
        yield RayCluster(address=address, pids=(head.pid, node.pid))
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
