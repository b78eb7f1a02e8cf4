"""``medimg tune-server``: sweep the serving knobs on our own bench and write the best
config (the Model Analyzer idea, for the embedded CPU server).

Knobs: the classifier's dynamic batcher (``max_queue_delay_microseconds``, preferred
batch sizes; ``NAME_preprocess`` keeps its own, as exported: no delay), classifier and
preprocess instance counts, and ONNX Runtime's intra-op threads, read from the repository
with :func:`serving.repository.model_config.options_from_config`. The sweep is coordinate
descent: one knob at a time over its values, the others held at the best so far, starting
from the repository's current config. A delay and a preferred size pay together (the size
caps each batch, so a queue splits evenly among the instances; the delay lets a short batch
wait for it), and coordinate descent moves one knob at a time: start from the export
defaults, which hold such a pair. Each trial serves a copy of the model set (configs
rewritten, version folders linked, not copied) on free loopback ports and runs ``medimg
bench`` at the given concurrency levels; the score is the throughput at the highest level,
among trials whose p99 at the lowest level fits ``--p99-budget-ms`` (while none fits, the
descent follows the lower p99, and the error names the closest configuration). The winner
is written into the repository only if it beats the current config by ``--min-gain``; the
old configs are kept as ``config.pbtxt.before-tune``::

    medimg tune-server --model pneumoniamnist-densenet121 --concurrency 1,16 --p99-budget-ms 15
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tritonclient.grpc import model_config_pb2

from serving.perf.bench import BenchOptions, LevelResult, run_bench
from serving.repository.layout import (
    CONFIG_FILE,
    ModelSet,
    next_version,
    read_config,
    spec_from_config,
    write_config,
)
from serving.repository.model_config import (
    RepositoryOptions,
    classifier_name,
    options_from_config,
    preprocess_name,
)
from serving.server.network import find_free_port
from serving.server.process import TritonServer
from training.errors import ConfigError, ServingError


@dataclass(frozen=True)
class Knobs:
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...]
    instances: int
    preprocess_instances: int
    intra_op_threads: int

    @classmethod
    def from_options(cls, options: RepositoryOptions) -> Knobs:
        """The knobs' values among a repository's options (:func:`options_from_config`)."""
        return cls(
            max_queue_delay_us=options.max_queue_delay_us,
            preferred_batch_sizes=options.preferred_batch_sizes,
            instances=options.instance_count,
            preprocess_instances=options.preprocess_instance_count,
            intra_op_threads=options.intra_op_threads,
        )

    def label(self) -> str:
        sizes = ",".join(map(str, self.preferred_batch_sizes)) or "-"
        return (
            f"delay {self.max_queue_delay_us}us pref {sizes} inst {self.instances} "
            f"pre-inst {self.preprocess_instances} threads {self.intra_op_threads}"
        )


def default_space(cores: int | None = None, send: str = "images") -> dict[str, tuple]:
    """The values each knob takes in the sweep, in sweep order. Instances come before
    threads: from the export default (threads 0 = cores / instances) one instance gets
    every core, the latency-first setting, rather than the one thread of two instances.
    With ``send="tensors"`` the bench never reaches ``NAME_preprocess``: its instance
    count is not swept (any difference would be noise, and noise would get written)."""
    cores = cores or os.cpu_count() or 1
    space = {
        "max_queue_delay_us": (0, 100, 500, 1000, 5000),
        "instances": (1, 2),
        "intra_op_threads": tuple(sorted({1, max(1, cores // 2), cores})),
        "preprocess_instances": (1, 2),
        "preferred_batch_sizes": ((), (8,), (4, 8, 16), (8, 16, 32)),
    }
    if send == "tensors":
        del space["preprocess_instances"]
    return space


@dataclass
class Trial:
    knobs: Knobs
    results: list[LevelResult]
    throughput: float
    p99_low_ms: float
    feasible: bool


def rank(trial: Trial) -> tuple[int, float]:
    """Order of preference: feasible trials by throughput; then, while no trial fits the
    p99 budget, the lower p99 (so the descent walks towards the budget instead of
    staying where it started); trials with failed requests last."""
    if trial.feasible:
        return 2, trial.throughput
    if any(r.failed for r in trial.results):
        return 0, 0.0
    return 1, -trial.p99_low_ms


def current_knobs(repository: Path, model: str) -> tuple[Knobs, ModelSet]:
    """The knobs of ``model``'s set as the repository holds them, and the set's models
    (``version``: the classifier's latest)."""
    ensemble = read_config(repository / model)
    spec = spec_from_config(ensemble)
    if ensemble.platform != "ensemble":
        raise ConfigError(f"{repository / model}: not a medimg ensemble (pass its NAME)")
    classifier = repository / classifier_name(spec)
    models = ModelSet(
        ensemble=repository / model,
        classifier=classifier,
        preprocess=repository / preprocess_name(spec),
        version=next_version(classifier) - 1,
    )
    cls = read_config(models.classifier)
    if cls.backend != "python":
        raise ConfigError(
            f"{models.classifier}: tune-server tunes the embedded CPU server's Python "
            f"backend; this config is {cls.platform or cls.backend!r} (exported with --target gpu)"
        )
    options = options_from_config(cls, read_config(models.preprocess))
    return Knobs.from_options(options), models


def apply_knobs(models: ModelSet, knobs: Knobs) -> dict[Path, model_config_pb2.ModelConfig]:
    """The set's configs with ``knobs`` applied, by model directory (not yet written)."""
    configs = {}
    for model_dir in (models.preprocess, models.classifier):
        config = read_config(model_dir)
        is_classifier = model_dir == models.classifier
        if is_classifier:
            batching = config.dynamic_batching
            batching.max_queue_delay_microseconds = knobs.max_queue_delay_us
            del batching.preferred_batch_size[:]
            batching.preferred_batch_size.extend(
                s for s in knobs.preferred_batch_sizes if s <= config.max_batch_size
            )
        del config.instance_group[1:]
        config.instance_group[0].count = (
            knobs.instances if is_classifier else knobs.preprocess_instances
        )
        if is_classifier:
            config.parameters["intra_op_threads"].string_value = str(knobs.intra_op_threads)
        configs[model_dir] = config
    return configs


def trial_repository(models: ModelSet, knobs: Knobs, dest: Path) -> Path:
    """A copy of the model set under ``dest``: new configs, everything else linked."""
    configs = apply_knobs(models, knobs)
    for source in (models.ensemble, models.preprocess, models.classifier):
        target = dest / source.name
        target.mkdir(parents=True)
        for entry in source.iterdir():
            if entry.name != CONFIG_FILE and not entry.name.startswith("."):
                (target / entry.name).symlink_to(entry.resolve())
        if source in configs:
            write_config(target, configs[source])
        else:
            shutil.copy2(source / CONFIG_FILE, target / CONFIG_FILE)
    return dest


def measure(models: ModelSet, knobs: Knobs, bench: BenchOptions) -> list[LevelResult]:
    with tempfile.TemporaryDirectory(prefix="medimg-tune-server-") as tmp:
        repo = trial_repository(models, knobs, Path(tmp) / "repository")
        ports = {"http_port": find_free_port(), "grpc_port": find_free_port()}
        ports["metrics_port"] = find_free_port()
        with TritonServer(repo, **ports) as server:
            url = (
                server.grpc_url
                if bench.protocol == "grpc"
                else server.http_url.removeprefix("http://")
            )
            return run_bench(replace(bench, url=url))


def sweep(
    repository: Path,
    model: str,
    bench: BenchOptions,
    *,
    space: dict[str, tuple] | None = None,
    p99_budget_ms: float = 0.0,
    on_trial: Callable[[Trial], None] | None = None,
) -> tuple[Trial, list[Trial]]:
    """(the current config's trial, every trial in order) of a coordinate-descent sweep."""
    space = space if space is not None else default_space()
    unknown = set(space) - set(Knobs.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"search space: unknown knob(s) {sorted(unknown)}")
    start, models = current_knobs(repository, model)
    low, high = min(bench.concurrency), max(bench.concurrency)
    seen: dict[Knobs, Trial] = {}

    def run(knobs: Knobs) -> Trial:
        if knobs not in seen:
            results = measure(models, knobs, bench)
            by_level = {r.concurrency: r for r in results}
            failed = sum(r.failed for r in results)
            p99 = by_level[low].p99_ms
            seen[knobs] = Trial(
                knobs=knobs,
                results=results,
                throughput=by_level[high].throughput if not failed else 0.0,
                p99_low_ms=p99,
                feasible=not failed and (not p99_budget_ms or p99 <= p99_budget_ms),
            )
            if on_trial is not None:
                on_trial(seen[knobs])
        return seen[knobs]

    baseline = best = run(start)
    for knob, values in space.items():
        for value in values:
            trial = run(replace(best.knobs, **{knob: value}))
            if rank(trial) > rank(best):
                best = trial
    return baseline, list(seen.values())


def write_best(repository: Path, model: str, knobs: Knobs) -> list[Path]:
    """Write ``knobs`` into the set's configs; keep the old ones as config.pbtxt.before-tune."""
    _, models = current_knobs(repository, model)
    written = []
    for model_dir, config in apply_knobs(models, knobs).items():
        shutil.copy2(model_dir / CONFIG_FILE, model_dir / "config.pbtxt.before-tune")
        written.append(write_config(model_dir, config))
    return written


def trial_rows(trials: list[Trial]) -> list[dict[str, object]]:
    rows = []
    for t in trials:
        row = {
            k: ",".join(map(str, v)) if isinstance(v, tuple) else v
            for k, v in asdict(t.knobs).items()
        }
        row.update(
            throughput=round(t.throughput, 1),
            p99_low_ms=round(t.p99_low_ms, 2),
            feasible=t.feasible,
        )
        rows.append(row)
    return rows


def check_result(best: Trial, baseline: Trial, min_gain: float) -> bool:
    """Whether ``best`` is worth writing: feasible and ``min_gain`` better than the baseline."""
    if not best.feasible:
        closest = (
            f"; the lowest p99 was {best.p99_low_ms:.2f} ms ({best.knobs.label()})"
            if rank(best)[0] == 1
            else ""
        )
        raise ServingError(
            "no configuration met the constraints (every trial failed requests or exceeded "
            f"--p99-budget-ms){closest}; the repository is unchanged"
        )
    if best.knobs == baseline.knobs:
        return False
    return not baseline.feasible or best.throughput >= baseline.throughput * (1 + min_gain)
