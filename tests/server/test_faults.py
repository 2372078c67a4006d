"""Fault injection against a live server on 127.0.0.1 (in this process, over a tiny model, so
that faults can be planted in its engine): the disconnect storm that once killed the engine,
a stalled reader, a sampler that raises for one request, forward steps that raise once, hang,
or keep raising. After each: /health 200 (or the server exited 1 where that is the design),
the next request 200, and no KV block held once idle."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
import tracemalloc
from dataclasses import dataclass, field

import httpx
import pytest
from engine_fixtures import make_tiny_model_dir
from kvpage_runtime import AsyncLLM, EngineConfig
from kvpage_runtime.server import ServerSettings, build_app

from .live_server import free_port, serving_in_thread

MAX_MODEL_LEN = 2304
IDLE_TIMEOUT_S = 60.0
POISON_SEED = 666  # requests with this seed make the sampler raise from their third token on


@dataclass
class Faults:
    """What the tests make go wrong inside the engine."""

    forward_failures: int = 0  # the next this many forward steps raise
    hang: threading.Event | None = None  # forward steps wait for it
    in_forward: threading.Event = field(default_factory=threading.Event)


def _plant(engine: AsyncLLM, faults: Faults) -> None:
    runner, sampler = engine.engine.runner, engine.engine.sampler
    execute = runner.execute

    def faulty_execute(batch, logits_indices):
        faults.in_forward.set()
        if faults.hang is not None:
            faults.hang.wait()
        if faults.forward_failures:
            faults.forward_failures -= 1
            raise RuntimeError("injected forward fault")
        return execute(batch, logits_indices)

    def faulty_sampler(logits, rows):
        if any(r.params.seed == POISON_SEED and len(r.output_token_ids) >= 2 for r in rows):
            if len(rows) == 1:
                raise FloatingPointError("injected sampler fault")
            raise FloatingPointError("this batch holds a poisoned row")
        return sampler(logits, rows)

    runner.execute = faulty_execute
    engine.engine.sampler = faulty_sampler


@dataclass
class InProcessServer:
    url: str
    engine: AsyncLLM
    settings: ServerSettings
    faults: Faults
    app: object

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=30)

    def complete(self, **body) -> httpx.Response:
        body = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, **body}
        return httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)

    def stats(self):
        return asyncio.run(self.engine.get_stats())

    def wait_idle(self):
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while True:
            stats = self.stats()
            if stats.num_running == stats.num_waiting == stats.num_blocks_held == 0:
                return stats
            assert time.monotonic() < deadline, f"not idle after {IDLE_TIMEOUT_S} s: {stats}"
            time.sleep(0.05)

    def assert_serving(self) -> None:
        """Idle with no block held, healthy, and serving the next request."""
        self.wait_idle()
        assert self.health().status_code == 200
        r = self.complete()
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        assert self.wait_idle().num_blocks_held == 0


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder, _ = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-faults"))
    config = EngineConfig(str(folder), dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN,
                          max_num_seqs=64, kv_cache_memory=64 << 20, scheduling_policy="priority")
    engine = AsyncLLM(config, max_waiting_requests=2048)
    faults = Faults()
    _plant(engine, faults)
    settings = ServerSettings()
    app = build_app(engine, settings)
    with serving_in_thread(app) as url:
        yield InProcessServer(url, engine, settings, faults, app)


def test_priority_reaches_the_engine(live):
    r = live.complete(priority=-3)
    assert r.status_code == 200, r.text
    live.assert_serving()


# ---- the disconnect storm ----------------------------------------------------------------


async def _long_stream(client: httpx.AsyncClient, index: int) -> str:
    body = {"prompt": [10 + index, 11, 12], "max_tokens": 300, "ignore_eos": True,
            "stream": True, "temperature": 0.8, "seed": index}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines()]
    data = [line for line in lines if line.startswith("data: ")]
    return data[-1] if data else f"{r.status_code}: {lines}"


async def _impatient(client: httpx.AsyncClient, index: int, timeout: float) -> str:
    body = {"prompt": [[5, index % 600], [6, index % 600], [7, index % 600]], "max_tokens": 8,
            "stream": index % 2 == 0}
    try:
        r = await client.post("/v1/completions", json=body,
                              timeout=httpx.Timeout(30, read=timeout))
        return str(r.status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


def test_disconnect_storm_leaves_the_engine_serving(live):
    """16 long streams run while 300 clients send 3 prompts each (half streaming) and hang up
    after 0-0.5 s: every cancellation point of the hand-off is hit, and the engine lives on."""
    rng = random.Random(11)
    timeouts = [rng.uniform(0.0, 0.5) for _ in range(300)]

    async def storm():
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=live.url, timeout=300, limits=limits) as client:
            longs = [asyncio.create_task(_long_stream(client, i)) for i in range(16)]
            results = await asyncio.gather(*(_impatient(client, i, t)
                                              for i, t in enumerate(timeouts)))
            assert live.engine.is_running
            return results, await asyncio.gather(*longs)

    results, long_ends = asyncio.run(storm())
    assert "500" not in results and all(r in ("200", "ReadTimeout") for r in results), results
    assert all(end == "data: [DONE]" for end in long_ends), long_ends
    live.assert_serving()


# ---- a reader that stops reading ----------------------------------------------------------


async def _stalled_stream(app, body: dict, stalled: asyncio.Event) -> None:
    """Runs one streaming request through the ASGI app whose socket never drains: the first
    body chunk is sent, every later send blocks (as uvicorn's does when the client stops
    reading), and the client never hangs up."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path":
             b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    messages = [{"type": "http.request", "body": raw, "more_body": False}]
    forever = asyncio.Event()

    async def receive():
        if messages:
            return messages.pop()
        await forever.wait()

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            stalled.set()
            await forever.wait()

    await app(scope, receive, send)


def test_a_stalled_reader_costs_one_output_not_the_whole_history(live):
    """2,000 tokens generated for a client whose socket does not drain: what waits for it is
    the newest output, a few hundred KB at most (it was every cumulative output: O(T^2))."""
    body = {"prompt": [20, 21, 22, 23], "max_tokens": 2000, "ignore_eos": True,
            "stream": True, "temperature": 0}

    async def run() -> int:
        stalled = asyncio.Event()
        task = asyncio.create_task(_stalled_stream(live.app, body, stalled))
        await stalled.wait()
        while (await live.engine.get_stats()).num_running:  # until the engine is done with it
            await asyncio.sleep(0.05)
        held = tracemalloc.get_traced_memory()[0]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return held

    asyncio.run(run())  # warm caches (tokenizer, detokenizer) outside the measurement
    live.wait_idle()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        held = asyncio.run(run()) - baseline
    finally:
        tracemalloc.stop()
    print(f"\nmemory held for a stalled reader after 2,000 tokens: {held / 1024:.0f} KiB")
    assert held < 400 * 1024
    live.assert_serving()


# ---- faults inside the engine --------------------------------------------------------------


def test_a_sampler_fault_fails_that_request_alone(live):
    async def run():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
            poisoned = client.post("/v1/completions", json={
                "prompt": [5, 6], "max_tokens": 8, "temperature": 0.9, "seed": POISON_SEED})
            streamed = client.post("/v1/completions", json={
                "prompt": [5, 7], "max_tokens": 8, "temperature": 0.9, "seed": POISON_SEED,
                "stream": True})
            fine = client.post("/v1/completions", json={"prompt": [5, 8], "max_tokens": 8,
                                                         "ignore_eos": True})  # sampled: EOS may come
            return await asyncio.gather(poisoned, streamed, fine)

    poisoned, streamed, fine = asyncio.run(run())
    assert poisoned.status_code == 500
    assert "injected sampler fault" in poisoned.json()["error"]["message"]
    assert streamed.status_code == 200  # the stream had begun: the error is its last event
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "injected sampler fault" in events[-2]
    assert json.loads(events[0])["choices"][0]["text"] is not None
    assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] == 8
    live.assert_serving()


def test_a_failed_forward_step_fails_its_requests_and_the_engine_recovers(live):
    before = live.stats().num_failed_steps
    live.faults.forward_failures = 1

    async def run():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={
                "prompt": [5, 9, i], "max_tokens": 8}) for i in range(3)))

    answers = asyncio.run(run())
    failed = [a for a in answers if a.status_code == 500]
    assert failed and all(a.status_code in (200, 500) for a in answers)
    assert all("injected forward fault" in a.json()["error"]["message"] for a in failed)
    assert live.stats().num_failed_steps == before + 1
    live.assert_serving()


def test_a_stuck_engine_shows_in_health(live):
    live.settings.stuck_timeout_s = 0.5
    live.faults.hang, live.faults.in_forward = threading.Event(), threading.Event()
    result: list[httpx.Response] = []
    client = threading.Thread(target=lambda: result.append(live.complete()))
    client.start()
    try:
        assert live.faults.in_forward.wait(60)
        deadline = time.monotonic() + 60
        while (health := live.health()).status_code == 200:
            assert time.monotonic() < deadline, "/health never noticed the stuck engine"
            time.sleep(0.1)
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_stuck"
    finally:
        live.faults.hang.set()
        live.faults.hang = None
        live.settings.stuck_timeout_s = 120.0
        client.join(60)
    assert result and result[0].status_code == 200
    live.assert_serving()


# ---- a fault that does not pass: the server exits 1 ----------------------------------------


def test_an_engine_that_keeps_failing_ends_the_server_with_status_1(tmp_path, monkeypatch):
    from kvpage_runtime import cli

    folder, _ = make_tiny_model_dir(tmp_path)
    faults = Faults(forward_failures=10**9)

    def load(args):
        engine = AsyncLLM(EngineConfig(str(folder), dtype="float32", device="cpu",
                                       max_model_len=256, kv_cache_memory=16 << 20))
        _plant(engine, faults)
        return engine

    monkeypatch.setattr(cli, "_load_async_engine", load)
    port = free_port()
    args = cli.build_parser().parse_args(["serve", str(folder), "--port", str(port),
                                          "--log-level", "warning"])
    answers: list[int] = []

    def clients():
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                answers.append(httpx.post(f"{url}/v1/completions", timeout=30,
                                          json={"prompt": [5, 6], "max_tokens": 2}).status_code)
            except httpx.HTTPError:
                if answers:  # it was up and has gone: done
                    return
                time.sleep(0.1)  # not up yet

    thread = threading.Thread(target=clients, daemon=True)
    thread.start()
    with socket.create_server(("127.0.0.1", port)) as sock:
        status = asyncio.run(cli._serve_async(args, sock))
    thread.join(60)
    assert status == 1
    assert answers and set(answers) <= {500, 503}
