"""64 concurrent streaming clients, a quarter of them hanging up early: nothing may leak."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx

CLIENTS = 64
MAX_TOKENS = 16


async def _stream(client: httpx.AsyncClient, index: int, disconnect: bool) -> tuple[bool, str]:
    body = {
        "prompt": f"Story number {index}: once upon a time",
        "max_tokens": MAX_TOKENS,
        "temperature": 0.8,
        "seed": index,
        "stream": True,
        "ignore_eos": True,
    }
    text, done = "", False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            text += json.loads(line[6:])["choices"][0]["text"]
            if disconnect and text:
                break  # leaving the block closes the connection mid-stream
    return done, text


async def _run_clients(server) -> list[tuple[bool, str]]:
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(
        base_url=server.url, headers=server.headers, timeout=180, limits=limits
    ) as client:
        return await asyncio.gather(
            *(_stream(client, i, disconnect=i % 4 == 0) for i in range(CLIENTS))
        )


def _wait_idle(server, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (
            m["kvpage:num_requests_running"] == 0
            and m["kvpage:num_requests_waiting"] == 0
            and m["kvpage:kv_blocks_held"] == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def test_many_streams_with_disconnects_leave_nothing_behind(server):
    before = server.metrics()
    results = asyncio.run(_run_clients(server))
    finished = [text for i, (done, text) in enumerate(results) if i % 4]
    assert all(done for i, (done, _) in enumerate(results) if i % 4)
    assert all(text for text in finished)
    m = _wait_idle(server)
    assert m["kvpage:num_requests_running"] == 0
    assert m["kvpage:num_requests_waiting"] == 0
    assert m["kvpage:kv_blocks_held"] == 0
    assert m["kvpage:kv_blocks_free"] == m["kvpage:kv_blocks_total"]
    ended = (
        m["kvpage:e2e_request_latency_seconds_count"]
        - before["kvpage:e2e_request_latency_seconds_count"]
    )
    assert ended == CLIENTS
    abort = 'kvpage:request_success_total{finished_reason="abort"}'
    assert m.get(abort, 0) - before.get(abort, 0) >= CLIENTS // 8


def test_non_streaming_client_that_gives_up_aborts_its_request(server):
    """The client hangs up once its request runs: the engine aborts it and frees its blocks."""
    before = server.metrics()
    body = {"prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True}

    async def give_up() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers,
                                     timeout=180) as client:
            request = asyncio.create_task(client.post("/v1/completions", json=body))
            while server.metrics()["kvpage:num_requests_running"] < 1:
                await asyncio.sleep(0.05)
            request.cancel()  # closes the connection mid-request
            with contextlib.suppress(asyncio.CancelledError):
                await request

    asyncio.run(give_up())
    m = _wait_idle(server)
    assert m["kvpage:num_requests_running"] == 0 and m["kvpage:kv_blocks_held"] == 0
    abort = 'kvpage:request_success_total{finished_reason="abort"}'
    assert m.get(abort, 0) - before.get(abort, 0) == 1
    assert m["kvpage:generation_tokens_total"] - before["kvpage:generation_tokens_total"] < 400
