"""What the synchronous and the asyncio clients share: connecting to a server, and the
item-by-item retry of a batch the server refused, written once.

The logic is written as generators that yield what to do and get the answer back
(:class:`Call` for one tritonclient call, an array for one inference request);
:func:`drive` runs such a generator with blocking calls, :func:`drive_async` with
awaited ones. Errors cross the same way: a call that fails is thrown into the generator
as a :class:`ServingError`, :class:`RequestRefused` when the server refused the input::

    python -c "from serving.clients.session import connect_steps; \
g = connect_steps('127.0.0.1:8000', 'http', ''); print(next(g).what)"
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from functools import partial
from operator import methodcaller
from typing import Any, TypeVar

import numpy as np

from serving.clients.contract import (
    ModelContract,
    Prediction,
    client_module,
    client_url,
    config_json,
    failed,
    finish_batch,
    join,
    ready_names,
    request_for,
)
from serving.clients.inputs import Item
from training.errors import RequestRefused, ServingError

S = TypeVar("S")  # what a generator asks for
A = TypeVar("A")  # the answer it gets back
R = TypeVar("R")  # what it returns


def _same(answer: Any) -> Any:
    return answer


@dataclass(frozen=True)
class Call:
    """One call of a tritonclient ``InferenceServerClient`` method; ``what`` names it in
    error messages and ``then`` turns the answer into what the caller wants."""

    what: str
    method: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    then: Callable[[Any], Any] = _same

    def start(self, client: Any) -> Any:
        """The method's answer (sync client), or the awaitable of it (asyncio client)."""
        return getattr(client, self.method)(*self.args, **self.kwargs)


LIVE = Call("liveness", "is_server_live")


def _as_json(protocol: str) -> dict:
    return {"as_json": True} if protocol == "grpc" else {}


def config_call(model: str, protocol: str) -> Call:
    """The config of ``model`` as JSON."""
    what, then = f"model config of {model!r}", partial(config_json, protocol=protocol)
    return Call(what, "get_model_config", (model,), _as_json(protocol), then)


def statistics_call(model: str, protocol: str) -> Call:
    """Triton's statistics for ``model`` as JSON (the same shape over HTTP and gRPC)."""
    what = f"statistics of {model!r}"
    return Call(what, "get_inference_statistics", (model,), _as_json(protocol))


def infer_call(
    mod: Any, protocol: str, model: str, input_name: str, array: np.ndarray, output: str
) -> Call:
    """One inference request with one input, answering the ``output`` array."""
    inputs, outputs = request_for(mod, protocol, input_name, array, output)
    then = methodcaller("as_numpy", output)
    return Call(f"inference on {model!r}", "infer", (model, inputs), {"outputs": outputs}, then)


def outputs_call(
    mod: Any, protocol: str, model: str, input_name: str, array: np.ndarray, outputs: Sequence[str]
) -> Call:
    """One inference request with one input, answering ``{name: array}`` for ``outputs``."""
    inputs, requested = request_for(mod, protocol, input_name, array, outputs)
    names = tuple(outputs)

    def then(result: Any) -> dict[str, np.ndarray]:
        return {name: result.as_numpy(name) for name in names}

    return Call(f"inference on {model!r}", "infer", (model, inputs), {"outputs": requested}, then)


def serving_error(message: str, exc: Exception) -> ServingError:
    """:class:`RequestRefused` when the server refused the input (HTTP 4xx, gRPC
    INVALID_ARGUMENT), else :class:`ServingError` (unreachable, timed out, server error)."""
    status_of = getattr(exc, "status", None)  # tritonclient's InferenceServerException
    status = status_of() if callable(status_of) else None
    refused = str(status).startswith("4") or status == "StatusCode.INVALID_ARGUMENT"
    return (RequestRefused if refused else ServingError)(message)


def unreachable(url: str, protocol: str, exc: BaseException) -> ServingError:
    return ServingError(f"cannot reach a Triton server at {url} over {protocol}: {exc}")


def call_failed(url: str, protocol: str, call: Call, exc: Exception) -> ServingError:
    """The error for a failed call: a failed liveness check means no server there."""
    if call is LIVE:
        return unreachable(url, protocol, exc)
    return serving_error(f"{url} ({protocol}): {call.what} failed: {exc}", exc)


def call_timed_out(url: str, protocol: str, call: Call, timeout_s: float) -> ServingError:
    if call is LIVE:
        return unreachable(url, protocol, TimeoutError())
    return ServingError(f"{url} ({protocol}): {call.what}: no answer in {timeout_s:.0f} s")


def open_client(mod: Any, protocol: str, url: str, timeout_s: float, *, aio: bool) -> Any:
    """A tritonclient ``InferenceServerClient`` for ``url`` (no request sent yet)."""
    try:
        if protocol == "grpc":
            return mod.InferenceServerClient(url)
        if aio:
            return mod.InferenceServerClient(url, conn_timeout=timeout_s)
        return mod.InferenceServerClient(
            url, connection_timeout=timeout_s, network_timeout=timeout_s
        )
    except Exception as exc:
        raise unreachable(url, protocol, exc) from exc


def only_ensemble(url: str, protocol: str) -> Generator[Call, Any, str]:
    """The one medimg ensemble ready on the server (its steps are not candidates)."""
    index = Call("repository index", "get_model_repository_index", kwargs=_as_json(protocol))
    ready = ready_names((yield index))
    ensembles = []
    for name in ready:
        if (yield config_call(name, protocol)).get("platform") == "ensemble":
            ensembles.append(name)
    if len(ensembles) != 1:
        raise ServingError(f"{url}: pass --model; models ready on this server: {ready or 'none'}")
    return ensembles[0]


def connect_steps(url: str, protocol: str, model: str) -> Generator[Call, Any, ModelContract]:
    """Check the server is live, find the model (``model``, or the only ensemble) and read
    its contract."""
    if not (yield LIVE):
        raise ServingError(f"Triton server at {url} is not live")
    name = model or (yield from only_ensemble(url, protocol))
    config = yield config_call(name, protocol)
    return ModelContract.from_config(name, config, url)


def classify_steps(
    batch: Sequence[Item],
    prepared: tuple[dict[int, Any], dict[int, Prediction]],
    contract: ModelContract,
) -> Generator[np.ndarray, np.ndarray, list[Prediction]]:
    """Every item's :class:`Prediction` for one batch, asking for one request per yielded
    input. A batch the server refuses (one file it cannot decode) is retried item by item;
    any other error (the server, not the input) fails every item at once."""
    payloads, results = prepared
    probs: dict[int, np.ndarray] = {}
    if payloads:
        try:
            probs = dict(zip(payloads, (yield join(payloads.values())), strict=True))
        except RequestRefused:  # one bad file refuses the batch: retry one by one
            for i, payload in payloads.items():
                try:
                    probs[i] = (yield join([payload]))[0]
                except ServingError as exc:
                    results[i] = Prediction(batch[i].name, error=f"{batch[i].name}: {exc}")
        except ServingError as exc:  # the server, not the input: every item fails
            results.update(failed(batch, payloads, exc))
    return finish_batch(batch, probs, results, contract)


def drive(steps: Generator[S, A, R], perform: Callable[[S], A]) -> R:
    """Run ``steps`` with blocking calls: each thing it yields is performed and the answer
    (or the exception raised) sent back in."""
    advance: Callable[[Any], S] = steps.send
    answer: Any = None
    while True:
        try:
            step = advance(answer)
        except StopIteration as stop:
            return stop.value
        try:
            advance, answer = steps.send, perform(step)
        except Exception as exc:
            advance, answer = steps.throw, exc


async def drive_async(steps: Generator[S, A, R], perform: Callable[[S], Awaitable[A]]) -> R:
    """:func:`drive` with awaited calls."""
    advance: Callable[[Any], S] = steps.send
    answer: Any = None
    while True:
        try:
            step = advance(answer)
        except StopIteration as stop:
            return stop.value
        try:
            advance, answer = steps.send, await perform(step)
        except Exception as exc:
            advance, answer = steps.throw, exc


class ClientBase:
    """What both clients hold: the tritonclient module, the server's address and, once
    connected, the model's :class:`ModelContract`. The synchronous client connects on
    construction (:meth:`_start`), the asyncio one in ``connect()``."""

    _aio = False  # whether the client speaks tritonclient's .aio modules

    def __init__(
        self,
        url: str = "",
        protocol: str = "http",
        model: str = "",
        timeout_s: float = 60.0,
        *,
        client_preprocess: bool = False,
        threshold: float | None = None,
    ) -> None:
        self._mod = client_module(protocol, aio=self._aio)
        self._threshold = threshold  # binary: overrides the model's operating threshold
        self.protocol = protocol
        self.url = client_url(url, protocol)
        self.timeout_s = timeout_s
        self._model = model
        self._preprocess_asked = client_preprocess
        self.client_preprocess = client_preprocess
        self._client: Any = None
        self._contract: ModelContract | None = None
        self._start()

    def _start(self) -> None:
        """What construction does after the fields are set: nothing here."""

    @property
    def contract(self) -> ModelContract:
        """The served model's contract (read-only; known once connected)."""
        if self._contract is None:
            raise ServingError(f"{type(self).__name__}: call connect() (or use `async with`)")
        return self._contract

    @property
    def module(self) -> Any:
        """The ``tritonclient`` module this client speaks (``InferInput``, ...)."""
        return self._mod

    def _open(self) -> None:
        self._client = open_client(
            self._mod, self.protocol, self.url, self.timeout_s, aio=self._aio
        )

    def _connect_steps(self) -> Generator[Call, Any, ModelContract]:
        return connect_steps(self.url, self.protocol, self._model)

    def _connected(self, contract: ModelContract) -> None:
        self._contract = contract.with_threshold(self._threshold)
        # a model that is not an ensemble takes tensors: preprocess here whatever was asked
        self.client_preprocess = self._preprocess_asked or not contract.accepts_bytes

    def _failed(self, call: Call, exc: Exception) -> ServingError:
        return call_failed(self.url, self.protocol, call, exc)

    def _infer_call(self, model: str, input_name: str, array: np.ndarray, output: str) -> Call:
        return infer_call(self._mod, self.protocol, model, input_name, array, output)

    def _outputs_call(self, array: np.ndarray, outputs: Sequence[str]) -> Call:
        """One request for ``array`` (to the ensemble or its classifier, by dtype)."""
        model, input_name = self.contract.target(array)
        return outputs_call(self._mod, self.protocol, model, input_name, array, outputs)

    def _batch_size(self, batch_size: int) -> int:
        """Items per request: ``batch_size`` (0: the model's max), at most the max."""
        most = self.contract.max_batch_size
        return min(batch_size or most, most)
