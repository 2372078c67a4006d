"""Bearer-token authentication (``--api-key`` / ``KVPAGE_API_KEY``), checked before the body.

With a key set, every path needs ``Authorization: Bearer <key>`` except /health and /version
(load balancers' probes): the API, /tokenize and /detokenize, /metrics and the generated API
documentation (/docs, /redoc, /openapi.json) alike. The check is ASGI middleware, so a request
without the key is refused before its body is read or parsed.
"""

from __future__ import annotations

import hmac

from kvpage_runtime.server.errors import APIError, send_error

OPEN_PATHS = frozenset({"/health", "/version"})


class APIKeyMiddleware:
    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers", ())).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # constant-time comparison: response timing leaks nothing about the key
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] != "http" or self._key is None or scope["path"] in OPEN_PATHS
                or self._authorized(scope)):
            await self.app(scope, receive, send)
            return
        await send_error(send, APIError("invalid or missing API key", 401,
                                        type="authentication_error", code="invalid_api_key"))
