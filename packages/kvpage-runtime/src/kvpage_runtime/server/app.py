"""The FastAPI application: routes, authentication, body limit, error mapping, lifespan."""

from __future__ import annotations

import contextlib
from importlib import metadata
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kvpage_runtime.server.auth import APIKeyMiddleware
from kvpage_runtime.server.chat import chat_prompt_ids, create_chat_completion
from kvpage_runtime.server.completions import create_completion
from kvpage_runtime.server.errors import APIError, error_response, install_error_handlers
from kvpage_runtime.server.limits import BodySizeLimitMiddleware
from kvpage_runtime.server.lora import lora_api
from kvpage_runtime.server.metrics import ServerMetrics
from kvpage_runtime.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from kvpage_runtime.server.state import ServerSettings, ServerState
from kvpage_runtime.server.streams import ClientDisconnected, cancel_on_disconnect

# Status nginx uses for "client closed request": nobody reads it, but it shows in access logs.
_CLIENT_CLOSED = 499


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _version() -> str:
    try:
        return metadata.version("kvpage-runtime")
    except metadata.PackageNotFoundError:
        return "unknown"


async def _answer(request: Request, work) -> Any:
    try:
        return await cancel_on_disconnect(request, work)
    except ClientDisconnected:
        return Response(status_code=_CLIENT_CLOSED)


api = APIRouter()


@api.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """The base model's names, then each LoRA adapter with its folder and base model."""
    state = _state(request)
    cards = [ModelCard(id=name, root=name, max_model_len=state.max_model_len)
             for name in state.model_names]
    cards += [ModelCard(id=lora.lora_name, root=lora.lora_path,
                        parent=lora.base_model_name or state.model_names[0],
                        max_model_len=state.max_model_len)
              for lora in state.loras]
    return ModelList(data=cards)


@api.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    return await _answer(request, create_completion(_state(request), body))


@api.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    return await _answer(request, create_chat_completion(_state(request), body))


@api.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = _state(request)
    state.check_model(body.model)
    if body.messages is not None:
        ids = chat_prompt_ids(state, body.messages, body.add_generation_prompt)
    elif body.prompt is not None:
        ids = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        raise APIError("give either prompt or messages", param="prompt")
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=list(ids))


@api.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = _state(request)
    state.check_model(body.model)
    state.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))


public = APIRouter()


def _unhealthy(state: ServerState) -> APIError | None:
    engine = state.engine
    if not getattr(engine, "is_running", True):
        reason = getattr(engine, "dead_error", None) or "engine is not running"
        return APIError(str(reason), 503, type="service_unavailable", code="engine_dead")
    stuck = engine.stuck_seconds() if hasattr(engine, "stuck_seconds") else 0.0
    if stuck > state.settings.stuck_timeout_s:
        return APIError(
            f"engine is stuck: no step finished for {stuck:.0f} s while requests wait "
            f"(limit {state.settings.stuck_timeout_s:g} s)",
            503,
            type="service_unavailable",
            code="engine_stuck",
        )
    return None


@public.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine serves requests; 503 once its loop has died or shut down, or while
    it makes no progress (no step finished for ``stuck_timeout_s`` with requests waiting)."""
    problem = _unhealthy(_state(request))
    return Response(status_code=200) if problem is None else error_response(problem)


@public.get("/version")
async def version() -> dict[str, str]:
    return {"version": _version()}


@public.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def build_app(engine: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The OpenAI-compatible app over an ``AsyncLLM`` (or anything with its interface).

    With an API key, every route but /health and /version needs it (see ``auth``), checked
    before the body is read; the body-size limit applies next. /v1/load_lora_adapter and
    /v1/unload_lora_adapter exist only with ``settings.allow_runtime_lora_updating``.
    """
    settings = settings or ServerSettings()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if settings.shutdown_engine:
            await engine.shutdown()

    app = FastAPI(title="kvpage", version=_version(), lifespan=lifespan)
    app.state.settings = settings
    app.state.server = ServerState(engine, settings, ServerMetrics(engine.stats))
    install_error_handlers(app)
    app.include_router(api)
    if settings.allow_runtime_lora_updating:
        app.include_router(lora_api)
    app.include_router(public)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)  # the outermost: runs first
    return app
