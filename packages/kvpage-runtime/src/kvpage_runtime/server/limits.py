"""ASGI middleware that refuses request bodies above a size limit with a 413."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from kvpage_runtime.server.errors import error_body


class BodySizeLimitMiddleware:
    """Checks ``Content-Length`` up front and counts the bytes of chunked bodies as they arrive.

    A chunked body that grows past the limit raises an ``HTTPException(413)`` from ``receive``,
    which the app's error handlers turn into the OpenAI error shape.
    """

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _message(self) -> str:
        return f"request body is larger than the limit of {self.max_body_bytes} bytes"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, send) -> None:
        body = json.dumps(
            error_body(self._message(), "invalid_request_error", code="request_too_large")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
