"""System shared memory for tensor requests: the client writes the input once into a
region the server maps, and reads the output from another, so no tensor bytes travel
through the HTTP body or the gRPC message (Triton's shared-memory extension; the
server must run on this machine). ``medimg bench --shared-memory`` uses it::

    medimg bench --model pneumoniamnist-densenet121_onnx --protocol grpc --shared-memory --concurrency 1,16
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import numpy as np

from serving.clients.session import Call
from training.errors import ConfigError, ServingError

if TYPE_CHECKING:
    from serving.clients.aio import AsyncTritonClassifier


class SharedMemorySlots:
    """``count`` pairs of input/output regions for ``array`` on ``client``'s server, one
    per concurrent worker; ``async with`` registers them and always unregisters."""

    def __init__(self, client: AsyncTritonClassifier, array: np.ndarray, count: int) -> None:
        if array.dtype != np.float32:
            raise ConfigError(
                "--shared-memory: needs a tensor model (NAME_onnx, FP32 input); "
                f"this model takes {array.dtype} (encoded images)"
            )
        self.client, self.array, self.count = client, np.ascontiguousarray(array), count
        spec = client.contract.spec
        self.out_shape = (len(array), spec.num_classes)
        self.in_bytes, self.out_bytes = self.array.nbytes, int(np.prod(self.out_shape)) * 4
        self.tag = f"medimg_{os.getpid()}_{secrets.token_hex(3)}"
        self._handles: list[tuple[str, object]] = []

    async def __aenter__(self) -> SharedMemorySlots:
        import tritonclient.utils.shared_memory as shm

        try:
            for i in range(self.count):
                for kind, size in (("in", self.in_bytes), ("out", self.out_bytes)):
                    name = f"{self.tag}_{i}_{kind}"
                    handle = shm.create_shared_memory_region(name, f"/{name}", size)
                    self._handles.append((name, handle))
                    if kind == "in":
                        shm.set_shared_memory_region(handle, [self.array])
                    what = f"register shared memory {name}"
                    args = (name, f"/{name}", size)
                    await self.client.perform(Call(what, "register_system_shared_memory", args))
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        import tritonclient.utils.shared_memory as shm

        for name, handle in self._handles:
            with contextlib.suppress(Exception):
                what = f"unregister shared memory {name}"
                await self.client.perform(Call(what, "unregister_system_shared_memory", (name,)))
            with contextlib.suppress(Exception):
                shm.destroy_shared_memory_region(handle)
        self._handles = []

    def sender(self, i: int) -> Callable[[], Awaitable[np.ndarray]]:
        """A coroutine function sending one request through worker ``i``'s regions."""
        import tritonclient.utils.shared_memory as shm

        client, contract = self.client, self.client.contract
        mod = client.module
        in_name, out_name = f"{self.tag}_{i}_in", f"{self.tag}_{i}_out"
        out_handle = dict(self._handles)[out_name]

        async def send() -> np.ndarray:
            inp = mod.InferInput(contract.spec.input_name, list(self.array.shape), "FP32")
            inp.set_shared_memory(in_name, self.in_bytes)
            out = mod.InferRequestedOutput(contract.spec.output_name)
            out.set_shared_memory(out_name, self.out_bytes)
            what = f"inference on {contract.tensor_model!r}"
            args = (contract.tensor_model, [inp])
            await client.perform(Call(what, "infer", args, {"outputs": [out]}))
            result = shm.get_contents_as_numpy(out_handle, np.float32, self.out_shape)
            if not np.isfinite(result).all():
                raise ServingError(f"{contract.tensor_model}: non-finite output in {out_name}")
            return result

        return send
