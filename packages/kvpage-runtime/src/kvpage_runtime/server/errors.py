"""Every error leaves the server in OpenAI's shape: ``{"error": {message, type, param, code}}``.

Bad input is always a 4xx; only a bug in the server or the engine gives a 500.
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvpage_runtime.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    RequestFailedError,
)
from kvpage_runtime.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("kvpage.server")

RETRY_AFTER_S = 1  # what an overloaded server tells clients to wait


class APIError(Exception):
    """An error the server answers with on purpose."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message,
            status,
            type,
            param,
            code,
        )
        self.headers = headers


def error_body(
    message: str, type: str, param: str | None = None, code: str | int | None = None
) -> dict:
    return ErrorResponse(
        error=ErrorInfo(message=message, type=type, param=param, code=code)
    ).model_dump()


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code),
        status_code=err.status,
        headers=err.headers,
    )


async def send_error(send, err: APIError) -> None:
    """Answers with ``err`` from ASGI middleware (before any route ran)."""
    body = json.dumps(error_body(err.message, err.type, err.param, err.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def engine_error(exc: Exception) -> APIError | None:
    """The answer to an error the engine raised about one request, or None if it is not one."""
    if isinstance(exc, InvalidRequestError):
        return _invalid_request(exc)
    if isinstance(exc, EngineOverloadedError):
        return APIError(str(exc), 503, type="service_unavailable", code="overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDeadError):
        return APIError(str(exc), 503, type="service_unavailable", code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return APIError(str(exc), 500, type="internal_error", code="request_failed")
    return None


def _validation_param(loc: tuple) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages.0.role"``."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(f"malformed JSON body: {first.get('ctx', {}).get('error', 'invalid JSON')}")
    param = _validation_param(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid request")
    if param is not None:
        message = f"{param}: {message}"
    if first.get("type") == "missing" and param is None:
        message = "request body is required"
    return APIError(message, param=param)


# The engine's messages start with the offending field: "temperature must be >= 0, got -1".
_LEADING_FIELD = re.compile(r"^([a-z_]+) (?:must|has|is|are)\b")


def _invalid_request(exc: InvalidRequestError) -> APIError:
    message = str(exc)
    param = getattr(exc, "param", None)
    if param is None and (match := _LEADING_FIELD.match(message)):
        param = match.group(1)
    return APIError(message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception a route can raise to an OpenAI-shaped response."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    async def _engine(_: Request, exc: Exception) -> JSONResponse:
        return error_response(engine_error(exc))

    for kind in (InvalidRequestError, EngineOverloadedError, EngineDeadError, RequestFailedError):
        app.add_exception_handler(kind, _engine)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if exc.status_code == 413 else None
        return error_response(
            APIError(str(exc.detail or phrase), exc.status_code, type=kind, code=code)
        )

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error while serving a request")
        return error_response(
            APIError(f"internal server error: {type(exc).__name__}", 500, type="internal_error")
        )


def to_api_error(exc: BaseException) -> APIError:
    """An exception raised inside a stream, as the error event sent to the client."""
    if isinstance(exc, APIError):
        return exc
    if (known := engine_error(exc)) is not None:
        return known
    logger.error("internal error while streaming", exc_info=exc)
    return APIError(f"internal server error: {type(exc).__name__}", 500, type="internal_error")
