"""What every route needs: the engine, its tokenizer and limits, the settings and the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvpage_runtime.server.errors import APIError
from kvpage_runtime.server.limits import RequestLimits
from kvpage_runtime.server.metrics import ServerMetrics

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_STUCK_TIMEOUT_S = 120.0


@dataclass
class ServerSettings:
    api_key: str | None = None
    served_model_names: list[str] = field(default_factory=list)  # empty: the engine's model name
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_engine: bool = True  # shut the engine down with the app
    limits: RequestLimits = field(default_factory=RequestLimits)
    # /health answers 503 once the engine finished no step for this long while requests wait
    stuck_timeout_s: float = DEFAULT_STUCK_TIMEOUT_S


@dataclass
class ServerState:
    engine: Any
    settings: ServerSettings
    metrics: ServerMetrics
    active: set[str] = field(default_factory=set)  # engine request ids in flight

    async def abort_all(self) -> None:
        """Aborts every request in flight at once; their streams end with finish_reason
        "abort"."""
        await self.engine.abort_many(list(self.active))

    @property
    def limits(self) -> RequestLimits:
        return self.settings.limits

    @property
    def max_num_seqs(self) -> int:
        return int(self.engine.max_num_seqs)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    @property
    def vocab_size(self) -> int:
        config = getattr(self.engine, "model_config", None)
        return int(getattr(config, "vocab_size", 0) or len(self.tokenizer))

    @property
    def model_names(self) -> list[str]:
        return self.settings.served_model_names or [self.engine.model_name]

    def check_model(self, name: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if name is None or name in self.model_names:
            return name or self.model_names[0]
        raise APIError(
            f"the model '{name}' does not exist; this server serves {self.model_names}",
            404,
            param="model",
            code="model_not_found",
        )

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(
                f"{param}: token ids must be in [0, {vocab}), got {bad[:5]}", param=param
            )
