"""AsyncLLM: an asyncio front over one LLMEngine, for the server.

A background thread owns the engine: it takes commands (add, abort) from a thread-safe inbox,
steps the engine while requests exist, and hands each RequestOutput to the asyncio queue of
its request with ``loop.call_soon_threadsafe``. The forward pass releases the GIL, so the
event loop stays responsive while the model runs.

The engine is also *built* on that thread, so that it is the only thread of the process that
runs torch's OpenMP parallel regions. A second OpenMP master (the main thread, had it loaded
the model) keeps its own docked worker threads; libgomp then counts more threads than CPUs
and stops its workers from spinning between parallel regions, and every op pays a futex
wake-up: measured 1.6x slower decode steps at 16 sequences on 2 cores.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from kvpage_runtime.engine.config import EngineConfig
from kvpage_runtime.engine.engine import LLMEngine
from kvpage_runtime.engine.outputs import EngineStats, RequestOutput
from kvpage_runtime.errors import KVPageError
from kvpage_runtime.sampling import SamplingParams

logger = logging.getLogger("kvpage_runtime")


class EngineDeadError(KVPageError):
    """The engine loop stopped on an error (or was shut down); no request can be served."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        """Builds the engine on its own thread and waits for it; a load error is raised here."""
        self._inbox: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None
        self._stopping = False
        self.engine: LLMEngine
        built: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(config or EngineConfig(**kwargs),
                                        built), name="kvpage-engine", daemon=True)
        self._thread.start()
        built.result()  # self.engine is set, or the load error is raised here

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLM:
        return cls(config)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def chat_template(self) -> str | None:
        return self.engine.chat_template

    @property
    def is_running(self) -> bool:
        """True while the engine loop serves requests: not failed, not shut down."""
        return self._error is None and not self._stopping and self._thread.is_alive()

    @property
    def errored(self) -> bool:
        """True once the engine loop has stopped on an error."""
        return self._error is not None

    @property
    def dead_error(self) -> EngineDeadError | None:
        """Why the engine cannot serve requests, or None while it runs."""
        if self.is_running:
            return None
        if self._error is not None:
            return EngineDeadError(f"engine loop failed: {self._error!r}")
        return EngineDeadError("engine is shut down")

    def stats(self) -> EngineStats:
        return self._stats

    async def generate(self, prompt: str | Sequence[int], sampling_params: SamplingParams | None,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Streams cumulative outputs; the last one has finished=True.

        Raises InvalidRequestError before yielding anything when the request is invalid.
        Leaving the iteration early (break, cancellation) aborts the request.
        """
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        params = sampling_params or SamplingParams()
        try:
            await self._call(lambda: self._add(request_id, prompt, params, stream))
        except asyncio.CancelledError:  # the add may still run: undo it
            self._submit(lambda: self._abort(request_id))
            raise
        finished = False
        try:
            while not finished:
                output = _latest(await stream.queue.get(), stream.queue)
                finished = output.finished
                yield output
        finally:
            if not finished:
                self._submit(lambda: self._abort(request_id))

    async def abort(self, request_id: str) -> None:
        await self._call(lambda: self._abort(request_id))

    async def shutdown(self) -> None:
        if self._thread.is_alive():
            self._submit(self._stop)
            await asyncio.to_thread(self._thread.join)

    # ---- engine thread ----------------------------------------------------------------------

    def _run(self, config: EngineConfig, built: Future) -> None:
        try:
            self.engine = LLMEngine(config)
            self._stats = self.engine.stats()
        except BaseException as exc:  # raised by the constructor, in the caller's thread
            built.set_exception(exc)
            return
        built.set_result(None)
        self._loop()

    def _add(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
             stream: _Stream) -> None:
        self.engine.add_request(request_id, prompt, params)
        self._streams[request_id] = stream

    def _abort(self, request_id: str) -> None:
        output = self.engine.abort_request(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None and output is not None:
            stream.put(output)

    def _stop(self) -> None:
        self._stopping = True

    def _submit(self, command: Callable[[], Any]) -> Future:
        future: Future = Future()
        if self._error is not None or self._stopping:
            future.set_exception(EngineDeadError(f"engine is not running: {self._error}"))
        else:
            self._inbox.put((command, future))
        return future

    async def _call(self, command: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self._submit(command))

    def _loop(self) -> None:
        reason = "engine is shut down"
        try:
            while not self._stopping:
                self._drain_inbox(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                self._stats = self.engine.stats()
        except BaseException as exc:  # every waiting request must learn why it ends
            logger.exception("engine loop failed")
            self._error = exc
            reason = f"engine loop failed: {exc!r}"
        for stream in self._streams.values():
            stream.put(EngineDeadError(reason))
        self._streams.clear()
        self._fail_inbox()

    def _drain_inbox(self, block: bool) -> None:
        try:
            command, future = self._inbox.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            _run_command(command, future)
            try:
                command, future = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            stream.put(output)

    def _fail_inbox(self) -> None:
        while True:
            try:
                _, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            future.set_exception(EngineDeadError("engine is shut down"))


def _run_command(command: Callable[[], Any], future: Future) -> None:
    try:
        future.set_result(command())
    except Exception as exc:  # handed to the caller through the future
        future.set_exception(exc)


def _latest(item: RequestOutput | BaseException, pending: asyncio.Queue) -> RequestOutput:
    """Outputs are cumulative: when several are queued, only the newest matters."""
    while True:
        if isinstance(item, BaseException):
            raise item
        if pending.empty():
            return item
        item = pending.get_nowait()
