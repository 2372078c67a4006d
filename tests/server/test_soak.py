"""A short soak: 64 concurrent clients of mixed behaviour (normal, early disconnect, slow
reader, bad input) for a few rounds against the live server. No 5xx, no failed engine step,
every block back, and the server still healthy; the figures are printed for the record."""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path

import httpx
import pytest

from .test_concurrency import _wait_idle

CLIENTS = 64
ROUNDS = 5
BAD_BODIES = [
    {"prompt": "hi", "temperature": -1},
    {"prompt": "hi", "max_tokens": 10_000_000},
    {"messages": [{"role": "user"}]},
    {"prompt": "hi", "response_format": {"type": "json_object"}},
    {"prompt": "hi", "stop": ["x"] * 100},
]


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def _normal(client: httpx.AsyncClient, i: int) -> int:
    body = {"prompt": f"Item {i}: a short note", "max_tokens": 12, "temperature": 0.7, "seed": i}
    if i % 2:
        return (await client.post("/v1/completions", json=body)).status_code
    body = {"messages": [{"role": "user", "content": f"Say hi to {i}"}], "max_tokens": 12,
            "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    last_event = json.loads(lines[-2].removeprefix("data: "))  # an error event: {"error": ...}
    assert lines[-1] == "data: [DONE]" and "error" not in last_event, lines[-2:]
    return r.status_code


async def _disconnects(client: httpx.AsyncClient, i: int) -> int:
    body = {"prompt": f"Story {i}", "max_tokens": 64, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break  # hang up mid-stream
    return r.status_code


async def _slow_reader(client: httpx.AsyncClient, i: int) -> int:
    body = {"prompt": f"Slowly {i}", "max_tokens": 24, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for _ in r.aiter_raw(64):
            await asyncio.sleep(0.05)
    return r.status_code


async def _bad_input(client: httpx.AsyncClient, i: int) -> int:
    body = BAD_BODIES[i % len(BAD_BODIES)]
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    return (await client.post(path, content=json.dumps(body).encode(),
                              headers={"Content-Type": "application/json"})).status_code


BEHAVIOURS = (_normal, _disconnects, _slow_reader, _bad_input)


@pytest.mark.slow
def test_soak_with_mixed_clients(server):
    """Two soak phases: the first grows the server to its working size (allocator pools, the
    KV cache's pages); the second must find it there, not growing on."""
    pid = server.process.pid
    before, rss_start = server.metrics(), _rss_kib(pid, "VmRSS")
    first = asyncio.run(_soak(server))
    rss_mid = _rss_kib(pid, "VmRSS")
    second = asyncio.run(_soak(server))
    after = _wait_idle(server)
    rss_end = _rss_kib(pid, "VmRSS")
    counts = first + second
    failed_steps = (after["kvpage:engine_step_failures_total"]
                    - before["kvpage:engine_step_failures_total"])
    print(f"\nsoak: {CLIENTS} clients x {ROUNDS} rounds, twice: {dict(counts)}; failed engine "
          f"steps {failed_steps:.0f}; server RSS {rss_start / 1024:.0f} MiB, +"
          f"{(rss_mid - rss_start) / 1024:.1f} MiB after phase 1, +"
          f"{(rss_end - rss_mid) / 1024:.1f} MiB after phase 2 (peak "
          f"{_rss_kib(pid, 'VmHWM') / 1024:.0f} MiB)")
    assert counts["5xx"] == 0
    assert counts["4xx"] == 2 * CLIENTS * ROUNDS // len(BEHAVIOURS)
    assert failed_steps == 0
    assert after["kvpage:kv_blocks_held"] == 0
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert rss_end - rss_mid < 64 * 1024, "the server keeps growing under the same load"


async def _soak(server) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    limits = httpx.Limits(max_connections=CLIENTS + 8)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=300,
                                 limits=limits) as client:

        async def one_client(i: int) -> None:
            for round_ in range(ROUNDS):
                behaviour = BEHAVIOURS[(i + round_) % len(BEHAVIOURS)]
                status = await behaviour(client, i * ROUNDS + round_)
                counts[f"{status // 100}xx"] += 1
                counts[behaviour.__name__.lstrip("_")] += 1

        await asyncio.gather(*(one_client(i) for i in range(CLIENTS)))
    return counts
