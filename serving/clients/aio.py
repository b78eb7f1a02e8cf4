"""The asyncio client for medimg models on Triton (``tritonclient.{http,grpc}.aio``).

Same contract (:mod:`serving.clients.contract`) and the same connect and retry code
(:mod:`serving.clients.session`) as the synchronous
:class:`serving.clients.sync.TritonClassifier`; several requests are kept in flight at
once, which lets the server's dynamic batcher and the ensemble's two steps overlap.
What ``medimg classify``, ``label``, ``triage`` and ``bench`` use::

    python - <<'PY'
    import asyncio
    from serving.clients.aio import AsyncTritonClassifier
    from serving.clients.inputs import collect_items

    async def main():
        async with AsyncTritonClassifier("127.0.0.1:8001", "grpc") as client:
            items, _ = collect_items(["../shared/data/samples"])
            for p in await client.classify_all(items):
                print(p.as_text())

    asyncio.run(main())
    PY
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from serving.clients.contract import Prediction, bytes_batch, chunks, prepare_batch
from serving.clients.inputs import Item
from serving.clients.session import (
    Call,
    ClientBase,
    call_timed_out,
    classify_steps,
    config_call,
    drive_async,
    statistics_call,
)


class AsyncTritonClassifier(ClientBase):
    """An asyncio connection to one medimg classifier; ``async with`` connects and closes."""

    _aio = True

    async def perform(self, call: Call) -> Any:
        """One tritonclient call, with the client's timeout; a failure is a
        :class:`ServingError` naming the server."""
        try:
            answer = await asyncio.wait_for(call.start(self._client), self.timeout_s)
        except asyncio.TimeoutError as exc:
            raise call_timed_out(self.url, self.protocol, call, self.timeout_s) from exc
        except Exception as exc:
            raise self._failed(call, exc) from exc
        return call.then(answer)

    async def connect(self) -> AsyncTritonClassifier:
        self._open()
        try:  # a failed connect closes its session (aiohttp warns of an unclosed one)
            self._connected(await drive_async(self._connect_steps(), self.perform))
        except BaseException:
            await self.close()
            raise
        return self

    async def model_config(self, model: str) -> dict:
        """The config of ``model`` as JSON."""
        return await self.perform(config_call(model, self.protocol))

    async def statistics(self, model: str) -> dict:
        """Triton's statistics for ``model`` as JSON (the same shape over HTTP and gRPC)."""
        return await self.perform(statistics_call(model, self.protocol))

    async def infer_array(
        self, model: str, input_name: str, array: np.ndarray, output: str = ""
    ) -> np.ndarray:
        """One request with one input; returns the named (default: the spec's) output."""
        output = output or self.contract.spec.output_name
        return await self.perform(self._infer_call(model, input_name, array, output))

    async def infer_outputs(
        self, array: np.ndarray, outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """One request asking for ``outputs`` (e.g. ``("probabilities", "cam")``): BYTES
        [n, 1] to the ensemble, FP32 (n, C, S, S) to the classifier; ``{name: array}``."""
        return await self.perform(self._outputs_call(array, outputs))

    async def send(self, array: np.ndarray) -> np.ndarray:
        """One request: BYTES [n, 1] to the ensemble, FP32 (n, C, S, S) to the classifier."""
        return await self.infer_array(*self.contract.target(array), array)

    async def infer_bytes(self, images: Sequence[bytes]) -> np.ndarray:
        size = self.contract.max_batch_size
        parts = [self.send(bytes_batch(p)) for p in chunks(list(images), size)]
        return np.concatenate(await asyncio.gather(*parts))

    async def _classify_batch(self, batch: list[Item]) -> list[Prediction]:
        c = self.contract
        prepared = await asyncio.to_thread(prepare_batch, batch, c, self.client_preprocess)
        return await drive_async(classify_steps(batch, prepared, c), self.send)

    async def classify_all(
        self,
        items: Sequence[Item],
        *,
        batch_size: int = 0,
        in_flight: int = 2,
        on_done: Callable[[int], None] | None = None,
    ) -> list[Prediction]:
        """Every item's :class:`Prediction`, in order, with up to ``in_flight`` requests of
        ``batch_size`` items (default: the model's max) at once; ``on_done(n)`` after each."""
        if self._contract is None:
            await self.connect()
        gate = asyncio.Semaphore(max(1, in_flight))

        async def one(batch: list[Item]) -> list[Prediction]:
            async with gate:
                out = await self._classify_batch(batch)
            if on_done is not None:
                on_done(len(batch))
            return out

        batches = await asyncio.gather(
            *(one(b) for b in chunks(list(items), self._batch_size(batch_size)))
        )
        return [p for batch in batches for p in batch]

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def __aenter__(self) -> AsyncTritonClassifier:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
