"""AsyncLLM: an asyncio front over one LLMEngine, for the server.

A background thread owns the engine: it takes commands (add, abort, LoRA adapter changes) from
a thread-safe inbox, steps the engine while requests exist, and hands each step's
RequestOutputs to the streams of their requests in one ``loop.call_soon_threadsafe``. The
forward pass releases the GIL, so the event loop stays responsive while the model runs. One
wake-up per step, not one per request: each wake-up is a write to the loop's self-pipe, a
system call that lets the event loop take the GIL while the engine thread still has Python
work to do for that step.

The engine is also *built* on that thread, so that it is the only thread of the process that
runs torch's OpenMP parallel regions. A second OpenMP master (the main thread, had it loaded
the model) keeps its own docked worker threads; libgomp then counts more threads than CPUs
and stops its workers from spinning between parallel regions, and every op pays a futex
wake-up: measured 1.6x slower decode steps at 16 sequences on 2 cores.

No caller can hurt the loop. A command whose caller stopped waiting (its asyncio task was
cancelled) before the engine thread took it is skipped; once taken it can no longer be
cancelled, so its result is delivered exactly once. Aborts are never skipped. A stream keeps
only the newest output of its request (outputs are cumulative), so a consumer that stops
reading costs one output however long the generation runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kvpage_runtime.engine.config import EngineConfig
from kvpage_runtime.engine.engine import LLMEngine
from kvpage_runtime.engine.outputs import EngineStats, RequestOutput
from kvpage_runtime.errors import EngineDeadError, EngineOverloadedError, RequestFailedError
from kvpage_runtime.lora.request import LoRARequest
from kvpage_runtime.sampling import SamplingParams

logger = logging.getLogger("kvpage_runtime")

_IDLE_WAIT_S = 0.5  # how long the idle loop blocks on its inbox before looking again


@dataclass
class _Command:
    """Work for the engine thread; ``future`` carries its result back to the caller."""

    run: Callable[[], Any]
    skippable: bool = True  # False: runs even when its caller stopped waiting (aborts, stop)
    future: Future = field(default_factory=Future)


class _Stream:
    """Where the engine thread leaves a request's newest output (and its error, if it fails)
    for the asyncio consumer. Outputs are cumulative: a newer one replaces an unread one. An
    error is raised after the output that preceded it has been read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        """From any thread."""
        _deliver([(self, item)])

    def set(self, item: RequestOutput | BaseException) -> None:
        """On the stream's event loop."""
        if self._error is not None:  # an error is the last word
            return
        if isinstance(item, BaseException):
            self._error = item
        else:
            self._latest = item
        self._ready.set()

    async def get(self) -> RequestOutput:
        await self._ready.wait()
        if self._latest is None:
            raise self._error
        item, self._latest = self._latest, None
        if self._error is None:
            self._ready.clear()
        return item


class AsyncLLM:
    def __init__(self, config: EngineConfig | None = None, *,
                 max_waiting_requests: int | None = None, **kwargs: Any) -> None:
        """Builds the engine on its own thread and waits for it; a load error is raised here.

        ``max_waiting_requests`` bounds the scheduler's waiting queue: beyond it ``generate``
        raises EngineOverloadedError (None: unbounded).
        """
        self.config = config or EngineConfig(**kwargs)
        self.max_waiting_requests = max_waiting_requests
        self._inbox: queue.Queue[_Command] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None
        self._stopping = False
        self._stopped: Future[BaseException | None] = Future()
        self._last_progress = time.monotonic()
        self._loras: tuple[LoRARequest, ...] = ()  # the engine's adapters, as of its last change
        self.engine: LLMEngine
        built: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(built,), name="kvpage-engine",
                                        daemon=True)
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
    def max_num_seqs(self) -> int:
        return self.config.max_num_seqs

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

    def stuck_seconds(self) -> float:
        """Seconds since the loop last finished a step while requests were waiting for one
        (0 while idle or making progress)."""
        if not self.engine.num_requests:
            return 0.0
        return time.monotonic() - self._last_progress

    async def wait_stopped(self) -> BaseException | None:
        """Returns when the loop ends: the error it died of, or None after a shutdown."""
        return await asyncio.shield(asyncio.wrap_future(self._stopped))

    def stats(self) -> EngineStats:
        """The snapshot taken after the loop's last iteration (never waits)."""
        return self._stats

    async def get_stats(self) -> EngineStats:
        """Stats taken on the engine thread after every command submitted before this call."""
        return await self._call(self.engine.stats)

    async def generate(self, prompt: str | Sequence[int], sampling_params: SamplingParams | None,
                       request_id: str, priority: int = 0,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Streams cumulative outputs (a slow consumer sees only the newest); the last one has
        finished=True. ``lora_request`` runs the request with that adapter (registered on first
        use, as ``LLMEngine.add_request`` does).

        Raises InvalidRequestError (or EngineOverloadedError) before yielding anything when the
        request cannot be queued, RequestFailedError if serving it fails, EngineDeadError if
        the engine stops. Leaving the iteration early (break, cancellation) aborts the request.
        """
        stream = _Stream(asyncio.get_running_loop())
        params = sampling_params or SamplingParams()
        try:
            await self._call(
                lambda: self._add(request_id, prompt, params, priority, lora_request, stream))
        except asyncio.CancelledError:  # the add may still run: undo it
            self._submit(lambda: self._abort([request_id]), skippable=False)
            raise
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self._submit(lambda: self._abort([request_id]), skippable=False)

    async def abort(self, request_id: str) -> None:
        await self.abort_many([request_id])

    async def abort_many(self, request_ids: Iterable[str]) -> None:
        """Aborts the requests in one command; each stream ends with finish_reason "abort"."""
        ids = list(request_ids)
        await asyncio.shield(asyncio.wrap_future(
            self._submit(lambda: self._abort(ids), skippable=False)))

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """Registers and loads an adapter; raises LoRAAdapterError if it cannot be served, or
        InvalidRequestError if LoRA is not enabled."""
        await self._call(lambda: self._add_lora(lora_request))

    async def remove_lora(self, lora_int_id: int) -> bool:
        """Forgets an adapter; False if it was not registered."""
        return await self._call(lambda: self._remove_lora(lora_int_id))

    def list_loras(self) -> list[LoRARequest]:
        """The registered adapters (a snapshot: never waits for the engine thread); it includes
        every change whose call has returned."""
        return list(self._loras)

    async def shutdown(self) -> None:
        if self._thread.is_alive():
            self._submit(self._stop, skippable=False)
            await asyncio.to_thread(self._thread.join)

    # ---- engine thread ----------------------------------------------------------------------

    def _run(self, built: Future) -> None:
        try:
            self.engine = LLMEngine(self.config)
            self._stats = self.engine.stats()
        except BaseException as exc:  # raised by the constructor, in the caller's thread
            built.set_exception(exc)
            return
        built.set_result(None)
        self._loop()

    def _add(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
             priority: int, lora_request: LoRARequest | None, stream: _Stream) -> None:
        limit = self.max_waiting_requests
        if limit is not None and self.engine.scheduler.num_waiting >= limit:
            raise EngineOverloadedError(
                f"the server is overloaded: {self.engine.scheduler.num_waiting} requests are "
                f"waiting (max_waiting_requests={limit}); retry later")
        try:
            self.engine.add_request(request_id, prompt, params, priority=priority,
                                    lora_request=lora_request)
        finally:
            if lora_request is not None:  # registered on first use, even if the add failed later
                self._snapshot_loras()
        self._streams[request_id] = stream

    def _add_lora(self, lora_request: LoRARequest) -> None:
        self.engine.add_lora(lora_request)
        self._snapshot_loras()

    def _remove_lora(self, lora_int_id: int) -> bool:
        removed = self.engine.remove_lora(lora_int_id)
        self._snapshot_loras()
        return removed

    def _snapshot_loras(self) -> None:
        self._loras = tuple(self.engine.list_loras())

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            output = self.engine.abort_request(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None and output is not None:
                stream.put(output)

    def _stop(self) -> None:
        self._stopping = True

    def _submit(self, run: Callable[[], Any], skippable: bool = True) -> Future:
        command = _Command(run, skippable)
        if self._error is not None or self._stopping:
            command.future.set_exception(self.dead_error)
        else:
            self._inbox.put(command)
        return command.future

    async def _call(self, command: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self._submit(command))

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                self._stats = self.engine.stats()
                self._last_progress = time.monotonic()
        except BaseException as exc:  # every waiting request must learn why it ends
            logger.exception("engine loop failed")
            self._error = exc
        self.engine.shutdown()
        reason = self.dead_error
        _deliver([(stream, reason) for stream in self._streams.values()])
        self._streams.clear()
        self._fail_inbox(reason)
        self._stopped.set_result(self._error)

    def _drain_inbox(self, block: bool) -> None:
        try:
            command = self._inbox.get(block=block, timeout=_IDLE_WAIT_S if block else None)
        except queue.Empty:
            return
        while True:
            _run_command(command)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        deliveries = []
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            deliveries.append((stream, _failure(output) or output))
        _deliver(deliveries)

    def _fail_inbox(self, reason: EngineDeadError) -> None:
        while True:
            try:
                future = self._inbox.get_nowait().future
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(reason)


def _deliver(deliveries: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    """Hands items to their streams (from any thread), waking each event loop once."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, item in deliveries:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
            loop.call_soon_threadsafe(_set_each, batch)


def _set_each(batch: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    for stream, item in batch:
        stream.set(item)


def _failure(output: RequestOutput) -> RequestFailedError | None:
    """The error of a request the engine failed, to raise in its consumer."""
    if output.error is None:
        return None
    return RequestFailedError(f"request {output.request_id} failed: {output.error}")


def _run_command(command: _Command) -> None:
    """Runs a command and settles its future exactly once.

    ``set_running_or_notify_cancel`` settles the race with a caller that gives up: it returns
    False when the future was cancelled first (the command is then skipped unless it must run,
    like an abort), and once it returned True the future can no longer be cancelled.
    """
    future = command.future
    wanted = future.set_running_or_notify_cancel()
    if not wanted and command.skippable:
        return
    try:
        result = command.run()
    except Exception as exc:  # handed to the caller through the future
        if wanted:
            future.set_exception(exc)
        else:
            logger.warning("a command whose caller left failed: %r", exc)
        return
    if wanted:
        future.set_result(result)
