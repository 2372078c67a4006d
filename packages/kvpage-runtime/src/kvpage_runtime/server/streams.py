"""Running engine requests for one HTTP request, and streaming them as server-sent events.

One HTTP request may hold several engine requests (a list of prompts). ``EngineRequests`` runs
them concurrently and merges their outputs; closing it cancels whatever still runs, which makes
the engine abort those requests and give back their KV blocks. Outputs are cumulative, so of
each engine request only the newest unread output is kept: a client that stops reading costs
one output per prompt, however long its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Send

from kvpage_runtime.lora.request import LoRARequest
from kvpage_runtime.server.errors import error_body, to_api_error
from kvpage_runtime.server.state import ServerState

T = TypeVar("T")


@dataclass
class EngineCall:
    """One engine request: what ``engine.generate`` is called with."""

    prompt: Any
    params: Any
    request_id: str
    priority: int = 0
    lora_request: LoRARequest | None = None


class EngineRequests:
    """Runs several engine requests at once and yields ``(index, RequestOutput)`` as they come."""

    def __init__(self, state: ServerState, calls: list[EngineCall]) -> None:
        self._state, self._calls = state, calls
        self._unread: dict[int, Any] = {}  # index -> newest output not yet taken
        self._error: BaseException | None = None
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._buffer: list[tuple[int, Any]] = []
        self._pending = len(calls)

    async def start(self) -> None:
        """Start every request and wait until each produced its first output.

        Errors the engine raises before generating (invalid prompt or parameters) therefore
        surface here, while the HTTP status can still say so.
        """
        self._tasks = [asyncio.create_task(self._pump(i, c)) for i, c in enumerate(self._calls)]
        seen: set[int] = set()
        try:
            while len(seen) < len(self._calls) and (item := await self._next()) is not None:
                seen.add(item[0])
                self._buffer.append(item)
        except BaseException:
            await self.aclose()
            raise

    async def __aiter__(self) -> AsyncIterator[tuple[int, Any]]:
        while self._buffer:
            yield self._buffer.pop(0)
        while (item := await self._next()) is not None:
            yield item

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _next(self) -> tuple[int, Any] | None:
        """The next (index, newest output), taking the requests in turn; None when all ended."""
        while True:
            if self._unread:
                index = next(iter(self._unread))
                return index, self._unread.pop(index)
            if self._error is not None:  # after the outputs that came before it
                await self.aclose()
                raise self._error
            if not self._pending:
                return None
            self._changed.clear()
            await self._changed.wait()

    async def _pump(self, index: int, call: EngineCall) -> None:
        tracker = self._state.metrics.track()
        self._state.active.add(call.request_id)
        try:
            async for output in self._state.engine.generate(
                call.prompt, call.params, call.request_id, priority=call.priority,
                lora_request=call.lora_request
            ):
                tracker.observe(output)
                self._unread.pop(index, None)  # re-inserted last: the requests take turns
                self._unread[index] = output
                self._changed.set()
        except Exception as exc:  # handed to the consumer, which raises it
            tracker.fail()
            self._error = self._error or exc
        finally:
            self._state.active.discard(call.request_id)
            tracker.close()
            self._pending -= 1
            self._changed.set()


def sse(payload: Any) -> str:
    """One server-sent event carrying a pydantic model or a JSON-able object."""
    if hasattr(payload, "model_dump_json"):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def error_event(exc: BaseException) -> str:
    """An error that happened after the stream started, as an OpenAI error event."""
    err = to_api_error(exc)
    return sse(error_body(err.message, err.type, err.param, err.code or err.status))


async def sse_body(events: AsyncGenerator[str, None]) -> AsyncIterator[str]:
    """A streamed response's body: ``events``, an error event if they fail midway, and always
    ``[DONE]``."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        yield error_event(exc)
    finally:
        await events.aclose()
    yield SSE_DONE


async def sse_response(requests: EngineRequests, events: AsyncGenerator[str, None]) -> SSEResponse:
    """Starts the engine requests, then streams ``events`` (see ``sse_body``); the response
    closes the requests however the stream ends (``SSEResponse``)."""
    await requests.start()
    return SSEResponse(sse_body(events), on_close=requests.aclose)


class SSEResponse(StreamingResponse):
    """A streaming response that always closes its body iterator.

    Starlette cancels the streaming task when the client disconnects; closing the iterator in
    every case (disconnect, send error, normal end) runs the generators' cleanup, and
    ``on_close`` then cancels the engine requests behind the stream (aborting them) even when
    the body never started.
    """

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()
                await self._on_close()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientDisconnected(Exception):
    pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but cancel it (aborting its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected


@dataclass
class Delta:
    """What a completion gained since the last chunk sent for it."""

    text: str
    token_ids: list[int]
    logprobs: list[Any]
    finish_reason: str | None
    stop_reason: Any


class DeltaTracker:
    """Turns the engine's cumulative outputs into per-chunk deltas, keyed by choice index."""

    def __init__(self) -> None:
        self._sent: dict[int, tuple[int, int, bool]] = {}  # index -> (chars, tokens, finished)

    def delta(self, index: int, output: Any) -> Delta | None:
        chars, tokens, finished = self._sent.get(index, (0, 0, False))
        if finished:
            return None
        text, ids = output.text[chars:], output.token_ids[tokens:]
        if not text and output.finish_reason is None:
            return None  # nothing to show yet (e.g. text held back by a possible stop string)
        positions = (output.logprobs or [])[tokens:]
        self._sent[index] = (
            len(output.text),
            len(output.token_ids),
            output.finish_reason is not None,
        )
        return Delta(text, list(ids), list(positions), output.finish_reason, output.stop_reason)
