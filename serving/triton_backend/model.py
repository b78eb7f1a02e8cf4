"""Triton Python-backend model that runs an ONNX classifier with ONNX Runtime.

:func:`serving.repository.write_classifier` copies this file verbatim into
``<repository>/<model>/<version>/model.py``; Triton's Python backend imports it
there, so it may import only the standard library, numpy, onnxruntime and
``triton_python_backend_utils``. The model config supplies everything else:
one input, one output, ``max_batch_size`` and the parameters ``onnx_file`` and
``intra_op_threads`` ("0" = this machine's cores divided by the model's instances, at least 1). Try it through a server::

    python -c "from pathlib import Path; from serving.server import TritonServer; \
s = TritonServer(Path('model_repository')); s.start(); s.wait_ready(); print(s.http_url); s.stop()"

With dynamic batching Triton hands :meth:`TritonPythonModel.execute` several
requests at once: the valid ones are concatenated into one ONNX Runtime run and
the result is split back; an invalid one gets an ``INVALID_ARG`` error (HTTP
400, gRPC INVALID_ARGUMENT) without failing its neighbours. Only a failure of ONNX
Runtime itself on valid input is ``INTERNAL`` (500); no exception leaves ``execute``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _error(message: str, invalid_argument: bool = True):
    code = pb_utils.TritonError.INVALID_ARG if invalid_argument else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _auto_threads(config: dict) -> int:
    """This machine's usable cores shared out among the model's instances (at least 1)."""
    instances = sum(int(g.get("count") or 1) for g in config.get("instance_group", [])) or 1
    return max(1, len(os.sched_getaffinity(0)) // instances)


class TritonPythonModel:
    """One ONNX Runtime session per model instance, built once in :meth:`initialize`."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = config.get("name", args.get("model_name", "?"))
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if len(config.get("input", [])) != 1 or len(config.get("output", [])) != 1:
            raise pb_utils.TritonModelException(
                f"model {self.model_name}: config must declare exactly one input and one output"
            )
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
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
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads") or 0) or _auto_threads(
            config
        )
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        onnx_inputs = [i.name for i in self.session.get_inputs()]
        onnx_outputs = [o.name for o in self.session.get_outputs()]
        if self.input_name not in onnx_inputs or self.output_name not in onnx_outputs:
            raise pb_utils.TritonModelException(
                f"model {self.model_name}: config names input {self.input_name!r} and output "
                f"{self.output_name!r}, but {path} has inputs {onnx_inputs} and outputs {onnx_outputs}"
            )

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
            batch = valid[0][1] if len(valid) == 1 else np.concatenate([a for _, a in valid])
            result = self.session.run([self.output_name], {self.input_name: batch})[0]
            if result.shape[0] != batch.shape[0]:
                raise RuntimeError(f"{batch.shape[0]} inputs gave {result.shape[0]} outputs")
            result = np.ascontiguousarray(result, dtype=np.float32)
            start = 0
            for index, array in valid:
                stop = start + array.shape[0]
                output = pb_utils.Tensor(self.output_name, result[start:stop])
                responses[index] = pb_utils.InferenceResponse(output_tensors=[output])
                start = stop
        except Exception as exc:
            message = f"model {self.model_name}: onnxruntime failed: {type(exc).__name__}: {exc}"
            for index, _ in valid:
                responses[index] = _error(message, invalid_argument=False)
        return responses

    def finalize(self):
        self.session = None
