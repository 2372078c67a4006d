"""AsyncLLM: cumulative streaming, validation before the first output, abort by call or by
leaving the iteration, and a dead engine loop (reported, and /health answers 503)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from engine_fixtures import make_tiny_model_dir
from kvpage_runtime import AsyncLLM, EngineConfig, InvalidRequestError, SamplingParams
from kvpage_runtime.engine.async_llm import EngineDeadError
from kvpage_runtime.server import build_app


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
        await asyncio.sleep(0.2)
        return early, aborted

    early, aborted = asyncio.run(run())
    assert len(early) == 2
    assert aborted[-1].finished and aborted[-1].outputs[0].finish_reason == "abort"
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == total


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
