"""/health follows the engine: 200 while its loop runs, 503 in OpenAI's error shape once it
has died. In-process, over httpx's ASGI transport, on a stand-in engine."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
from kvpage_runtime.engine.async_llm import EngineDeadError
from kvpage_runtime.server import ServerSettings, build_app


class _Engine:
    """The parts of AsyncLLM that building the app and /health read."""

    model_name = "stand-in"
    max_model_len = 64

    def __init__(self) -> None:
        self.is_running = True
        self.dead_error = None

    def stats(self):
        return SimpleNamespace(
            num_running=0,
            num_waiting=0,
            kv_cache_usage=0.0,
            prefix_cache_hit_rate=0.0,
            num_total_blocks=1,
            num_free_blocks=1,
        )

    async def shutdown(self) -> None:
        pass


def _get_health(engine) -> httpx.Response:
    app = build_app(engine, ServerSettings(api_key="secret"))

    async def get():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/health")

    return asyncio.run(get())


def test_health_is_200_while_the_engine_runs():
    response = _get_health(_Engine())
    assert response.status_code == 200 and response.content == b""


def test_health_is_503_once_the_engine_loop_died():
    engine = _Engine()
    engine.is_running = False
    engine.dead_error = EngineDeadError("engine loop failed: RuntimeError('boom')")
    response = _get_health(engine)
    assert response.status_code == 503
    assert response.json() == {
        "error": {
            "message": "engine loop failed: RuntimeError('boom')",
            "type": "service_unavailable",
            "param": None,
            "code": "engine_dead",
        }
    }
