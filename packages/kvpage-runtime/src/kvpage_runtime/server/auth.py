"""Bearer-token authentication for the API routes (``--api-key`` / ``KVPAGE_API_KEY``)."""

from __future__ import annotations

import hmac

from fastapi import Request

from kvpage_runtime.server.errors import APIError


def check_api_key(request: Request) -> None:
    """FastAPI dependency: require ``Authorization: Bearer <key>`` when the server has a key.

    The comparison runs in constant time so that response timing leaks nothing about the key.
    """
    expected: str | None = request.app.state.settings.api_key
    if not expected:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise APIError(
            "invalid or missing API key", 401, type="authentication_error", code="invalid_api_key"
        )
