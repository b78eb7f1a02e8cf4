"""The asyncio client for medimg models on Triton (``tritonclient.{http,grpc}.aio``).

Same contract and request code as the synchronous :class:`serving.clients.sync.TritonClassifier`;
several requests are kept in flight at once, which lets the server's dynamic batcher
and the ensemble's two steps overlap. What ``medimg classify``, ``label``, ``triage``
and ``bench`` use::

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

from serving.clients.inputs import Item
from serving.clients.sync import (
    ModelContract,
    Prediction,
    bytes_batch,
    chunks,
    client_module,
    client_url,
    config_json,
    failed,
    finish_batch,
    join,
    prepare_batch,
    ready_names,
    request_for,
    serving_error,
)
from serving.repository.model_config import IMAGE_INPUT
from training.errors import RequestRefused, ServingError


class AsyncTritonClassifier:
    """An asyncio connection to one medimg classifier; ``async with`` connects and closes."""

    def __init__(
        self,
        url: str = "",
        protocol: str = "http",
        model: str = "",
        timeout_s: float = 60.0,
        *,
        client_preprocess: bool = False,
    ) -> None:
        self._mod = client_module(protocol, aio=True)
        self.protocol, self.url, self.timeout_s = protocol, client_url(url, protocol), timeout_s
        self._model, self._client_preprocess = model, client_preprocess
        self._client: Any = None
        self.contract: ModelContract | None = None
        self.client_preprocess = client_preprocess

    async def _call(self, what: str, coro) -> Any:
        try:
            return await asyncio.wait_for(coro, self.timeout_s)
        except asyncio.TimeoutError as exc:
            raise ServingError(
                f"{self.url} ({self.protocol}): {what}: no answer in {self.timeout_s:.0f} s"
            ) from exc
        except Exception as exc:
            raise serving_error(f"{self.url} ({self.protocol}): {what} failed: {exc}", exc) from exc

    async def connect(self) -> AsyncTritonClassifier:
        try:
            if self.protocol == "http":
                self._client = self._mod.InferenceServerClient(
                    self.url, conn_timeout=self.timeout_s
                )
            else:
                self._client = self._mod.InferenceServerClient(self.url)
            live = await asyncio.wait_for(self._client.is_server_live(), self.timeout_s)
        except Exception as exc:
            await self.close()
            raise ServingError(
                f"cannot reach a Triton server at {self.url} over {self.protocol}: {exc}"
            ) from exc
        try:  # a failed connect closes its session (aiohttp warns of an unclosed one)
            if not live:
                raise ServingError(f"Triton server at {self.url} is not live")
            name = self._model or await self._only_ensemble()
            config = await self.model_config(name)
            self.contract = ModelContract.from_config(name, config, self.url)
        except BaseException:
            await self.close()
            raise
        self.client_preprocess = self._client_preprocess or not self.contract.accepts_bytes
        return self

    async def model_config(self, model: str) -> dict:
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        answer = await self._call(
            f"model config of {model!r}", self._client.get_model_config(model, **kwargs)
        )
        return config_json(answer, self.protocol)

    async def _only_ensemble(self) -> str:
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        index = await self._call(
            "repository index", self._client.get_model_repository_index(**kwargs)
        )
        ready = ready_names(index, self.protocol)
        ensembles = [n for n in ready if (await self.model_config(n)).get("platform") == "ensemble"]
        if len(ensembles) != 1:
            raise ServingError(
                f"{self.url}: pass --model; models ready on this server: {ready or 'none'}"
            )
        return ensembles[0]

    async def statistics(self, model: str) -> dict:
        """Triton's statistics for ``model`` as JSON (the same shape over HTTP and gRPC)."""
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        return await self._call(
            f"statistics of {model!r}", self._client.get_inference_statistics(model, **kwargs)
        )

    async def infer_array(
        self, model: str, input_name: str, array: np.ndarray, output: str = ""
    ) -> np.ndarray:
        """One request with one input; returns the named (default: the spec's) output."""
        output = output or self._contract.spec.output_name
        inputs, outputs = request_for(self._mod, self.protocol, input_name, array, output)
        result = await self._call(
            f"inference on {model!r}", self._client.infer(model, inputs, outputs=outputs)
        )
        return result.as_numpy(output)

    @property
    def _contract(self) -> ModelContract:
        if self.contract is None:
            raise ServingError("AsyncTritonClassifier: call connect() (or use `async with`)")
        return self.contract

    async def send(self, array: np.ndarray) -> np.ndarray:
        """One request: BYTES [n, 1] to the ensemble, FP32 (n, C, S, S) to the classifier."""
        c = self._contract
        if array.dtype == np.object_:
            return await self.infer_array(c.model, IMAGE_INPUT, array)
        return await self.infer_array(c.tensor_model, c.spec.input_name, array)

    async def infer_bytes(self, images: Sequence[bytes]) -> np.ndarray:
        size = self._contract.max_batch_size
        parts = [self.send(bytes_batch(p)) for p in chunks(list(images), size)]
        return np.concatenate(await asyncio.gather(*parts))

    async def _classify_batch(self, batch: list[Item]) -> list[Prediction]:
        c = self._contract
        payloads, results = await asyncio.to_thread(prepare_batch, batch, c, self.client_preprocess)
        probs: dict[int, np.ndarray] = {}
        if payloads:
            try:
                probs = dict(zip(payloads, await self.send(join(payloads.values())), strict=True))
            except RequestRefused:  # one bad file refuses the batch: retry one by one
                for i, payload in payloads.items():
                    try:
                        probs[i] = (await self.send(join([payload])))[0]
                    except ServingError as exc:
                        results[i] = Prediction(batch[i].name, error=f"{batch[i].name}: {exc}")
            except ServingError as exc:  # the server, not the input: every item fails
                results.update(failed(batch, payloads, exc))
        return finish_batch(batch, probs, results, c)

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
        if self.contract is None:
            await self.connect()
        size = min(batch_size or self._contract.max_batch_size, self._contract.max_batch_size)
        gate = asyncio.Semaphore(max(1, in_flight))

        async def one(batch: list[Item]) -> list[Prediction]:
            async with gate:
                out = await self._classify_batch(batch)
            if on_done is not None:
                on_done(len(batch))
            return out

        batches = await asyncio.gather(*(one(b) for b in chunks(list(items), size)))
        return [p for batch in batches for p in batch]

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def __aenter__(self) -> AsyncTritonClassifier:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
