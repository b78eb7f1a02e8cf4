"""Starting or joining Ray for ``train``, ``tune`` and ``pipeline``: the address, the
environment every worker gets, and each worker's CPUs and GPUs.

Without ``--ray-address`` (or ``RAY_ADDRESS``) a new local instance is started, its
dashboard on a free loopback port; with one, that cluster is joined::

    medimg train --dataset pneumoniamnist --epochs 1 --max-train-samples 256
    medimg train --dataset pneumoniamnist --ray-address auto
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from training.config import TrainConfig
from training.errors import TrainingError
from training.precision import check_workers_can
from training.worker_logs import route_ray_output

TRAIN_POLL_VAR, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"  # see train_env


def ray_address(cfg: TrainConfig) -> str:
    """``--ray-address``, else ``RAY_ADDRESS``, else ``"local"``: a new local instance.
    Never Ray's own fallback for no address, which joins whatever the last ``ray start``
    on this machine wrote to ``ray_current_cluster`` and, when that cluster is gone,
    waits on its dead address for minutes."""
    return cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"


def init_ray(cfg: TrainConfig, **kwargs: Any) -> None:
    """Start or join Ray as :func:`ray_address` says, with :func:`train_env` in every
    worker's environment; a new local instance gets :func:`local_dashboard`. Workers'
    output is routed (``training.worker_logs``)."""
    import ray

    address = ray_address(cfg)
    env = train_env()
    if address == "local":
        port, dashboard_env = local_dashboard()
        kwargs.setdefault("dashboard_port", port)
        env.update(dashboard_env)
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
    ray.init(
        address=address,
        log_to_driver=True,
        configure_logging=False,
        runtime_env=runtime_env,
        **kwargs,
    )
    route_ray_output()  # workers' records as records; Ray's lines to a listening console


def train_env() -> dict[str, str]:
    """Ray Train settings for every worker (a value already in this environment wins).
    The controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``; Ray's
    2 s default is also how long a finished run can wait before it ends, which measured
    3.0-4.9 s of every run's end (``benchmarks/train_overhead.py``) against 0.4-1.5 s at
    0.25 s. A poll is one small actor call per worker; one that takes longer than the
    interval is only counted as late (a worker is declared dead after 10 minutes)."""
    return {TRAIN_POLL_VAR: os.environ.get(TRAIN_POLL_VAR) or TRAIN_POLL_S}


def local_dashboard() -> tuple[int, dict[str, str]]:
    """For a new local instance: a free loopback port for the dashboard, and the
    environment that points every worker at it. Train V2's PlacementGroupCleaner, which
    frees the workers of a finished or stopped run, finds the State API by auto-detection,
    which fails when another Ray instance runs on this machine ("Found multiple active Ray
    instances"): a tuning job's next trial then waits for those CPUs forever
    (WorkerGroupStartupTimeoutError)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return port, {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}


def resolve_resources(cfg: TrainConfig) -> TrainConfig:
    """Start or join Ray (``ray_address``), then fill in CPUs and GPUs per worker: GPUs
    when asked for or when this machine has CUDA, else the cluster's CPUs shared out."""
    import ray

    if not ray.is_initialized():
        init_ray(cfg)
    if cfg.gpus_per_worker > 0:
        cfg.use_gpu = True
    elif cfg.use_gpu or (not cfg.ray_address and torch.cuda.is_available()):
        cfg.use_gpu, cfg.gpus_per_worker = True, 1.0
    resources = ray.cluster_resources()
    if cfg.use_gpu and resources.get("GPU", 0) < cfg.gpus_per_worker * cfg.workers:
        raise TrainingError(
            f"{cfg.workers} worker(s) x {cfg.gpus_per_worker} GPU need "
            f"{cfg.workers * cfg.gpus_per_worker:g} GPUs; the Ray cluster has {resources.get('GPU', 0):g}"
        )
    if not cfg.cpus_per_worker:  # share the CPUs out, but no worker asks for more than a node has
        total = int(resources.get("CPU", 1))
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
        cfg.cpus_per_worker = float(max(1, min(total // cfg.workers, int(largest))))
    check_workers_can(cfg)  # here in the driver, not in every worker
    return cfg
