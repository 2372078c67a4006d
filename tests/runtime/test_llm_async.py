"""AsyncLLM: cumulative streaming, validation before the first output, abort by call or by
leaving the iteration, cancellation at every point of the command hand-off, faults that fail
one request or one step, and a dead engine loop (reported, and /health answers 503)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from engine_fixtures import make_tiny_model_dir
from kvpage_runtime import (
    AsyncLLM,
    EngineConfig,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    RequestFailedError,
    SamplingParams,
)
from kvpage_runtime.server import build_app

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder, _ = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-async"))
    engine = AsyncLLM(EngineConfig(str(folder), dtype="float32", device="cpu", max_model_len=256))
    yield engine
    asyncio.run(engine.shutdown())


async def _collect(engine, prompt, params, rid, stop_after=None, started=None):
    outputs = []
    async for out in engine.generate(prompt, params, rid):
        outputs.append(out)
        if started is not None:
            started.set()
        if stop_after is not None and len(outputs) >= stop_after:
            break
    return outputs


def test_streams_cumulative_outputs(engine):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)

    async def run():
        return await asyncio.gather(_collect(engine, [5, 6, 7], params, "a"),
                                    _collect(engine, [9, 10, 11, 12], params, "b"))

    for outputs in asyncio.run(run()):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        tokens = [o.outputs[0].token_ids for o in outputs]
        assert all(tokens[i] == tokens[-1][: len(tokens[i])] for i in range(len(tokens)))
        assert len(tokens[-1]) == 10
        assert outputs[-1].outputs[0].finish_reason == "length"
    assert engine.engine.model_config.vocab_size == 640 and engine.max_model_len == 256


def test_invalid_request_raises_before_yielding(engine):
    async def run():
        await _collect(engine, [5] * 300, SamplingParams(), "too-long")

    with pytest.raises(InvalidRequestError, match="300 tokens"):
        asyncio.run(run())


def test_abort_by_leaving_and_by_call(engine):
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    total = engine.stats().num_total_blocks

    async def run():
        early = await _collect(engine, [5, 6, 7, 8], params, "leaves", stop_after=2)
        started = asyncio.Event()
        consumer = asyncio.create_task(_collect(engine, [7, 8, 9], params, "aborted",
                                                started=started))
        await started.wait()
        await engine.abort("aborted")
        aborted = await consumer
        return early, aborted, await engine.get_stats()

    early, aborted, stats = asyncio.run(run())
    assert len(early) == 2
    assert aborted[-1].finished and aborted[-1].outputs[0].finish_reason == "abort"
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == total


class _Gate:
    """Holds the engine thread inside ``add_request`` of one request id until opened."""

    def __init__(self, engine: AsyncLLM, request_id: str, after: bool = False) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        original = engine.engine.add_request

        def add_request(rid, *args, **kwargs):
            if rid == request_id and not after:
                self.entered.set()
                self.release.wait()
            group = original(rid, *args, **kwargs)
            if rid == request_id and after:
                self.entered.set()
            return group

        self.add_request = add_request


async def _serves_and_holds_nothing(engine: AsyncLLM, rid: str) -> None:
    outputs = await _collect(engine, [5, 6, 7], GREEDY, rid)
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 4
    stats = await engine.get_stats()
    assert stats.num_running == stats.num_waiting == stats.num_blocks_held == 0


@pytest.mark.parametrize("moment", ["queued", "running", "ran"])
def test_a_cancelled_add_never_kills_the_loop(engine, monkeypatch, moment):
    """The client goes away while its add waits in the inbox, while the engine thread runs it,
    or after it ran but before the event loop saw the result: the request is undone (or never
    added) and the engine serves the next one."""
    target = f"cancelled-{moment}"
    gate = _Gate(engine, "blocker" if moment == "queued" else target, after=moment == "ran")
    monkeypatch.setattr(engine.engine, "add_request", gate.add_request)

    async def run():
        if moment == "queued":  # the engine thread is busy with another add meanwhile
            blocker = asyncio.create_task(_collect(engine, [5, 6], GREEDY, "blocker"))
            await asyncio.to_thread(gate.entered.wait)
        victim = asyncio.create_task(_collect(engine, [7, 8, 9], GREEDY, target))
        if moment == "queued":
            await asyncio.sleep(0)  # let the victim queue its add
            victim.cancel()
            gate.release.set()
            await blocker
        elif moment == "running":
            await asyncio.to_thread(gate.entered.wait)
            victim.cancel()
            gate.release.set()
        else:
            await asyncio.sleep(0)  # the victim's add is queued
            gate.entered.wait()  # blocks the event loop: the result cannot be delivered yet
            victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert engine.is_running
        await _serves_and_holds_nothing(engine, f"after-{moment}")

    asyncio.run(run())


def test_a_fault_in_one_request_fails_it_alone(engine, monkeypatch):
    """The detokenizer (or a stop check) of one request raises: that request fails with
    RequestFailedError, the others in the same steps finish normally."""
    original = engine.engine._append_token

    def append_token(seq, token, lp):
        if seq.group.request_id == "faulty" and len(seq.token_ids) == 2:
            raise UnicodeError("injected detokenizer fault")
        return original(seq, token, lp)

    monkeypatch.setattr(engine.engine, "_append_token", append_token)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def run():
        return await asyncio.gather(_collect(engine, [5, 6, 7], params, "faulty"),
                                    _collect(engine, [8, 9, 10], params, "healthy"),
                                    return_exceptions=True)

    faulty, healthy = asyncio.run(run())
    assert isinstance(faulty, RequestFailedError) and "injected detokenizer fault" in str(faulty)
    assert healthy[-1].finished and len(healthy[-1].outputs[0].token_ids) == 8
    asyncio.run(_serves_and_holds_nothing(engine, "after-request-fault"))


def test_a_sampler_fault_fails_only_the_rows_that_raise(engine, monkeypatch):
    sampler = engine.engine.sampler

    class Faulty:
        def __call__(self, logits, rows):
            if any(r.params.seed == 666 for r in rows):
                if len(rows) == 1:
                    raise FloatingPointError("injected sampler fault")
                raise FloatingPointError("the batch fails")
            return sampler(logits, rows)

    monkeypatch.setattr(engine.engine, "sampler", Faulty())
    poisoned = SamplingParams(temperature=0.7, seed=666, max_tokens=4)

    async def run():
        return await asyncio.gather(_collect(engine, [5, 6, 7], poisoned, "poisoned"),
                                    _collect(engine, [8, 9, 10], GREEDY, "fine"),
                                    return_exceptions=True)

    poisoned_out, fine = asyncio.run(run())
    assert isinstance(poisoned_out, RequestFailedError) and "injected sampler fault" in str(
        poisoned_out)
    assert fine[-1].finished and len(fine[-1].outputs[0].token_ids) == 4
    asyncio.run(_serves_and_holds_nothing(engine, "after-sampler-fault"))


def test_a_failed_forward_step_fails_its_requests_and_the_engine_recovers(engine, monkeypatch):
    runner = engine.engine.runner
    original, calls = runner.execute, []

    def execute(batch, logits_indices):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected forward fault")
        return original(batch, logits_indices)

    monkeypatch.setattr(runner, "execute", execute)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def run():
        failed = await asyncio.gather(_collect(engine, [5, 6, 7], params, "step-a"),
                                      _collect(engine, [8, 9], params, "step-b"),
                                      return_exceptions=True)
        stats = await engine.get_stats()
        return failed, stats

    failed, stats = asyncio.run(run())
    assert all(isinstance(f, RequestFailedError) and "injected forward fault" in str(f)
               for f in failed)
    assert stats.num_failed_steps >= 1 and stats.num_blocks_held == 0
    assert engine.is_running
    asyncio.run(_serves_and_holds_nothing(engine, "after-step-fault"))


def test_a_full_waiting_queue_refuses_with_overloaded(tmp_path):
    folder, _ = make_tiny_model_dir(tmp_path)
    config = EngineConfig(str(folder), dtype="float32", device="cpu", max_model_len=64,
                          max_num_seqs=1)
    engine = AsyncLLM(config, max_waiting_requests=1)
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def run():
        running, waiting = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(_collect(engine, [5, 6], long, "first", started=running))
        await running.wait()  # "first" holds the only running slot
        second = asyncio.create_task(_collect(engine, [5, 7], long, "second", started=waiting))
        while (await engine.get_stats()).num_waiting < 1:
            await asyncio.sleep(0)
        with pytest.raises(EngineOverloadedError, match="max_waiting_requests=1"):
            await _collect(engine, [5, 8], long, "third")
        await asyncio.gather(first, second)
        return await engine.get_stats()

    try:
        stats = asyncio.run(run())
        assert stats.num_blocks_held == 0
    finally:
        asyncio.run(engine.shutdown())


def test_loop_failure_marks_the_engine_dead(tmp_path, monkeypatch):
    folder, _ = make_tiny_model_dir(tmp_path)
    engine = AsyncLLM(EngineConfig(str(folder), dtype="float32", device="cpu", max_model_len=64))
    assert engine.is_running and not engine.errored and engine.dead_error is None

    def broken_step():
        raise RuntimeError("step failed")

    monkeypatch.setattr(engine.engine, "step", broken_step)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def run():
        with pytest.raises(EngineDeadError, match="step failed"):
            await _collect(engine, [5, 6, 7], params, "dies")
        transport = httpx.ASGITransport(app=build_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/health")

    health = asyncio.run(run())
    assert not engine.is_running and engine.errored
    assert health.status_code == 503 and "step failed" in health.json()["error"]["message"]
    with pytest.raises(EngineDeadError):
        asyncio.run(_collect(engine, [5, 6], params, "after"))
