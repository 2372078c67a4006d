"""OpenAI-compatible HTTP server over ``AsyncLLM``.

``build_app`` loads on first use, so that reading ``server.state`` (the ``kvpage`` command's
option defaults) does not import the engine and torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvpage_runtime.server.state import ServerSettings

__all__ = ["ServerSettings", "build_app"]

if TYPE_CHECKING:
    from kvpage_runtime.server.app import build_app


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from kvpage_runtime.server.app import build_app

        return build_app
    raise AttributeError(f"module 'kvpage_runtime.server' has no attribute {name!r}")
