"""OpenAI-compatible HTTP server over ``AsyncLLM``."""

from kvpage_runtime.server.app import build_app
from kvpage_runtime.server.state import ServerSettings

__all__ = ["ServerSettings", "build_app"]
