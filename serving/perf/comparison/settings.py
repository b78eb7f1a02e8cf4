"""What the side-by-side serving benchmark measures and how, as one dataclass: the options
of ``benchmarks/serving_side_by_side.py`` (whose command line fills it; its defaults are
these), also what ``benchmarks/serving_sweep.py`` measures each configuration with::

    python -c "from serving.perf.comparison.settings import Settings; print(Settings())"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from serving.repository.model_config import RepositoryOptions

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
# Repository options the benchmark lets one override: its option -> RepositoryOptions field.
REPOSITORY_FLAGS = {
    "max_queue_delay_us": "max_queue_delay_us",
    "preferred_batch_sizes": "preferred_batch_sizes",
    "instances": "instance_count",
    "intra_op_threads": "intra_op_threads",
    "max_batch_size": "max_batch_size",
    "borrow_idle_cores": "borrow_idle_cores",
}
_EXPORTED = RepositoryOptions()  # what ``medimg export`` writes


@dataclass(frozen=True)
class Settings:
    """The benchmark's settings (see the script's ``--help`` for each)."""

    dataset: str = "pneumoniamnist"
    data_dir: str = ""
    image_size: int = 64
    model_repository: str = ""  # reuse this repository ("": make the model here)
    model: str = ""  # the classifier in ``model_repository``
    weights: str = ""  # save_weights file for the naive baseline
    train_steps: int = 8
    duration_s: float = 10.0
    warmup_s: float = 2.0
    concurrency: int = 16
    protocol: str = "grpc"
    load_generator: str = "perf_analyzer"  # or "medimg"
    perf_analyzer: str = ""  # a binary to use ("": found or fetched)
    shared_memory: str = "none"  # or "system"
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    sweep_s: float = 2.0
    latency_runs: int = 500
    rounds: int = 4
    quiet_cpu: float = 0.2
    # the repository written when ``model_repository`` is "" (REPOSITORY_FLAGS)
    max_queue_delay_us: int = _EXPORTED.max_queue_delay_us
    preferred_batch_sizes: tuple[int, ...] = _EXPORTED.preferred_batch_sizes
    instances: int = _EXPORTED.instance_count
    intra_op_threads: int = _EXPORTED.intra_op_threads
    max_batch_size: int = _EXPORTED.max_batch_size
    borrow_idle_cores: bool = _EXPORTED.borrow_idle_cores

    @classmethod
    def from_options(cls, values: dict) -> Settings:
        """The settings among ``values`` (e.g. a command line's, by option name); values
        that are None or absent keep their defaults, other keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})

    def repository_options(self) -> RepositoryOptions:
        """The ``RepositoryOptions`` of the repository written here."""
        return RepositoryOptions(
            max_batch_size=self.max_batch_size,
            preferred_batch_sizes=tuple(self.preferred_batch_sizes),
            max_queue_delay_us=self.max_queue_delay_us,
            instance_count=self.instances,
            intra_op_threads=self.intra_op_threads,
            borrow_idle_cores=bool(self.borrow_idle_cores),
        )

    def public(self) -> dict:
        """The settings for a JSON report."""
        return asdict(self)


def command_line_defaults() -> dict:
    """The defaults of every setting but the repository options (a command line leaves
    those None to tell an option given from one not given)."""
    return {k: v for k, v in asdict(Settings()).items() if k not in REPOSITORY_FLAGS}
