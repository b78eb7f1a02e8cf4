"""Triton Python-backend model that runs an ONNX classifier with ONNX Runtime.

:func:`serving.repository.layout.write_model_set` copies this file verbatim into
``<repository>/<model>/<version>/model.py``; Triton's Python backend imports it
there, so it may import only the standard library, numpy, onnxruntime and
``triton_python_backend_utils``. The model config supplies everything else:
one input, its outputs (the probabilities, and the class activation maps of a model
exported with them), ``max_batch_size`` and the parameters ``onnx_file``,
``intra_op_threads`` ("0" = this machine's cores divided by the model's instances, at least
1) and ``borrow_idle_cores``. Try it through a server::

    python -c "from pathlib import Path; from serving.server.process import TritonServer; \
s = TritonServer(Path('model_repository')); s.start(); s.wait_ready(); print(s.http_url); s.stop()"

With dynamic batching Triton hands :meth:`TritonPythonModel.execute` several
requests at once: the valid ones are concatenated into one ONNX Runtime run and
the result is split back; an invalid one gets an ``INVALID_ARG`` error (HTTP
400, gRPC INVALID_ARGUMENT) without failing its neighbours. Only a failure of ONNX
Runtime itself on valid input is ``INTERNAL`` (500); no exception leaves ``execute``.

Outputs: each request gets the declared outputs it asked for
(``request.requested_output_names()``; all of them when it names none, or when that call
is not there), and ONNX Runtime computes only the union the batch asked for, so a request
for the probabilities alone does not pay for the maps. Triton itself returns only the
outputs a client requested, whatever a model produces.

Borrowing idle cores (``borrow_idle_cores: "1"``, with several instances of fewer threads
than cores): each instance also holds a session over all the cores, and runs a batch on it
when no other instance of this server is running one. One lock file shared by the server's
instances decides it: a narrow run holds a shared lock, a wide run needs the exclusive lock
without waiting (else it runs narrow), and a narrow run waits for a wide one to end, so the
threads never outnumber the cores. A lone request (the common case at low load) gets every
core instead of its instance's share; under load the instances run narrow side by side. The
wide session stops its threads' spin-waiting when a run ends (``session.force_spinning_stop``),
so an idle instance takes no CPU from a busy one. So does every session of more than one
thread (one instance over all the cores, say): between runs a spinning thread holds a core
that the gRPC frontend and the stub's IPC need for the next request, which lengthened the
concurrency-1 tail (one 2-thread instance, perf_analyzer, 4 alternating rounds: p99 6.80 ms
spinning against 4.95 ms not; p50 3.72 against 3.80 ms). The lock file is ``$MEDIMG_CORE_LOCK``
(``serving.server.process`` sets it under the server's private shared-memory prefix, removed on
stop), else ``/dev/shm/medimg-cores-<tritonserver pid>``.
"""

from __future__ import annotations

import fcntl
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _error(message: str, invalid_argument: bool = True):
    code = pb_utils.TritonError.INVALID_ARG if invalid_argument else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _instances(config: dict) -> int:
    return sum(int(g.get("count") or 1) for g in config.get("instance_group", [])) or 1


def _core_lock_path() -> str:
    return os.environ.get("MEDIMG_CORE_LOCK") or f"/dev/shm/medimg-cores-{os.getppid()}"


def _session(path: str, threads: int, *, stop_spinning: bool = False):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if stop_spinning:  # no spin-waiting between runs: an idle wide session takes no CPU
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


class TritonPythonModel:
    """Per model instance one ONNX Runtime session over its share of the cores, and one
    over every core when it borrows idle cores; both built once in :meth:`initialize`."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = config.get("name", args.get("model_name", "?"))
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if len(config.get("input", [])) != 1 or not config.get("output"):
            raise pb_utils.TritonModelException(
                f"model {self.model_name}: config must declare exactly one input and at least "
                "one output"
            )
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]
        self.output_name = self.output_names[0]  # the probabilities
        self.dims = tuple(int(d) for d in config["input"][0]["dims"])
        self.max_batch_size = int(config.get("max_batch_size", 0))
        if self.max_batch_size < 1:
            raise pb_utils.TritonModelException(
                f"model {self.model_name}: max_batch_size must be >= 1, got {self.max_batch_size}"
            )

        onnx_file = params.get("onnx_file") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], onnx_file)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"model {self.model_name}: no ONNX file at {path}")
        cores, instances = len(os.sched_getaffinity(0)), _instances(config)
        threads = int(params.get("intra_op_threads") or 0) or max(1, cores // instances)
        # threads > 1: no spin-waiting between runs (a spinning idle thread takes a core
        # from the gRPC frontend and the stub's IPC, which lengthens the tail)
        self.session = _session(path, threads, stop_spinning=threads > 1)
        onnx_inputs = [i.name for i in self.session.get_inputs()]
        onnx_outputs = [o.name for o in self.session.get_outputs()]
        if self.input_name not in onnx_inputs or not set(self.output_names) <= set(onnx_outputs):
            raise pb_utils.TritonModelException(
                f"model {self.model_name}: config names input {self.input_name!r} and outputs "
                f"{self.output_names}, but {path} has inputs {onnx_inputs} and outputs {onnx_outputs}"
            )
        self.wide, self._lock, self.wide_runs, self.runs = None, None, 0, 0
        if params.get("borrow_idle_cores") == "1" and instances > 1 and threads < cores:
            lock = _core_lock_path()
            try:
                self._lock = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:  # still serves, on this instance's share of the cores
                pb_utils.Logger.log_warn(
                    f"model {self.model_name}: no borrowing of idle cores: cannot open the "
                    f"core lock {lock}: {exc}"
                )
            else:
                self.wide = _session(path, cores, stop_spinning=True)
        how = f"model {self.model_name}: ONNX Runtime on {threads} thread(s)"
        if self.wide is not None:
            how += f", on {cores} when no other instance runs"
        if threads > 1 or self.wide is not None:
            how += "; threads stop spinning after each run"
        pb_utils.Logger.log_info(how)

    def _problem(self, array: np.ndarray) -> str | None:
        """What is wrong with one request's input, or None."""
        expected = f"[n, {', '.join(map(str, self.dims))}] with 1 <= n <= {self.max_batch_size}"
        if array.dtype != np.float32:
            return f"input {self.input_name!r}: expected dtype FP32 (float32), got {array.dtype}"
        shape = tuple(array.shape)
        if len(shape) != len(self.dims) + 1 or shape[1:] != self.dims:
            return f"input {self.input_name!r}: expected shape {expected}, got {list(shape)}"
        if not 1 <= shape[0] <= self.max_batch_size:
            return f"input {self.input_name!r}: expected shape {expected}, got batch of {shape[0]}"
        return None

    def _requested(self, request) -> list[str]:
        """The declared outputs ``request`` asked for, in declared order (all: none named)."""
        ask = getattr(request, "requested_output_names", None)
        names = set(ask()) if callable(ask) else set()
        return [n for n in self.output_names if n in names] or list(self.output_names)

    def execute(self, requests):
        """One response per request, always: an exception escaping here would make Triton
        answer every request of the batch with 500."""
        try:
            return self._execute(requests)
        except Exception as exc:  # a bug of ours, not the input's: INTERNAL
            message = f"model {self.model_name}: {type(exc).__name__}: {exc}"
            return [_error(message, invalid_argument=False) for _ in requests]

    def _execute(self, requests):
        responses = [None] * len(requests)
        valid = []  # (request index, array)
        for index, request in enumerate(requests):
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
                if tensor is None:
                    responses[index] = _error(f"missing input {self.input_name!r}")
                    continue
                array = tensor.as_numpy()
            except Exception as exc:
                responses[index] = _error(f"input {self.input_name!r}: unreadable ({exc})")
                continue
            problem = self._problem(array)
            if problem:
                responses[index] = _error(f"model {self.model_name}: {problem}")
            else:
                valid.append((index, array))
        if not valid:
            return responses

        try:
            asked = {index: self._requested(requests[index]) for index, _ in valid}
            names = [n for n in self.output_names if any(n in a for a in asked.values())]
            batch = valid[0][1] if len(valid) == 1 else np.concatenate([a for _, a in valid])
            results = {}
            for name, result in zip(names, self._run(batch, names), strict=True):
                if result.shape[0] != batch.shape[0]:
                    raise RuntimeError(
                        f"{batch.shape[0]} inputs gave {result.shape[0]} rows of {name!r}"
                    )
                results[name] = np.ascontiguousarray(result, dtype=np.float32)
            start = 0
            for index, array in valid:
                stop = start + array.shape[0]
                outputs = [pb_utils.Tensor(n, results[n][start:stop]) for n in asked[index]]
                responses[index] = pb_utils.InferenceResponse(output_tensors=outputs)
                start = stop
        except Exception as exc:
            message = f"model {self.model_name}: onnxruntime failed: {type(exc).__name__}: {exc}"
            for index, _ in valid:
                responses[index] = _error(message, invalid_argument=False)
        return responses

    def _run(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """The outputs ``names`` of ONNX Runtime on ``batch``: over every core when no other
        instance is running (the exclusive lock, never waited for), else over this
        instance's share."""
        self.runs += 1
        if self.wide is None:
            return self.session.run(names, {self.input_name: batch})
        try:
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            session = self.wide
            self.wide_runs += 1
        except OSError:  # another instance is running: our share, once no wide run is on
            fcntl.lockf(self._lock, fcntl.LOCK_SH)
            session = self.session
        try:
            return session.run(names, {self.input_name: batch})
        finally:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)

    def finalize(self):
        if self.wide is not None:
            pb_utils.Logger.log_info(
                f"model {self.model_name}: {self.wide_runs} of {self.runs} runs on every core"
            )
            os.close(self._lock)
        self.session = self.wide = None
