"""What every route needs: the engine, its tokenizer and limits, the settings and the metrics,
and the models it serves: the base model and the engine's LoRA adapters, by name."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from kvpage_runtime.lora.request import LoRARequest
from kvpage_runtime.server.errors import APIError
from kvpage_runtime.server.limits import RequestLimits
from kvpage_runtime.server.metrics import ServerMetrics

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_STUCK_TIMEOUT_S = 120.0
# vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING: whether /v1/(un)load_lora_adapter are routed
RUNTIME_LORA_UPDATING_ENV = "KVPAGE_ALLOW_RUNTIME_LORA_UPDATING"
_TRUE = ("1", "true", "yes", "on")


def runtime_lora_updating_allowed() -> bool:
    """Whether ``$KVPAGE_ALLOW_RUNTIME_LORA_UPDATING`` is 1, true, yes or on."""
    return os.environ.get(RUNTIME_LORA_UPDATING_ENV, "").strip().lower() in _TRUE


@dataclass
class ServerSettings:
    api_key: str | None = None
    served_model_names: list[str] = field(default_factory=list)  # empty: the engine's model name
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_engine: bool = True  # shut the engine down with the app
    limits: RequestLimits = field(default_factory=RequestLimits)
    # /health answers 503 once the engine finished no step for this long while requests wait
    stuck_timeout_s: float = DEFAULT_STUCK_TIMEOUT_S
    # serve /v1/load_lora_adapter and /v1/unload_lora_adapter (default: from the environment)
    allow_runtime_lora_updating: bool = field(default_factory=runtime_lora_updating_allowed)


@dataclass
class ServerState:
    engine: Any
    settings: ServerSettings
    metrics: ServerMetrics
    active: set[str] = field(default_factory=set)  # engine request ids in flight
    # one adapter change at a time, so that names stay unique
    _lora_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _last_lora_id: int = field(default=0, init=False)

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

    @property
    def loras(self) -> list[LoRARequest]:
        return self.engine.list_loras()

    def find_lora(self, name: str) -> LoRARequest | None:
        return next((lora for lora in self.loras if lora.lora_name == name), None)

    def check_model(self, name: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        return self.resolve_model(name)[0]

    def resolve_model(self, name: str | None) -> tuple[str, LoRARequest | None]:
        """The name to answer with and the adapter it selects (None: the base model); vLLM's
        404 for a model this server does not serve."""
        if name is None or name in self.model_names:
            return name or self.model_names[0], None
        if (lora := self.find_lora(name)) is not None:
            return name, lora
        raise APIError(f"The model `{name}` does not exist.", 404, type="NotFoundError",
                       param="model", code=404)

    async def load_lora(self, name: str, path: str, base_model_name: str | None = None) -> None:
        """Registers and loads an adapter under a new name: APIError (400) for a name in use;
        the engine's LoRAAdapterError, or InvalidRequestError with LoRA disabled, pass on."""
        async with self._lora_lock:
            if name in self.model_names:
                raise APIError(f"'{name}' is the base model's name; give the adapter another",
                               param="lora_name")
            if self.find_lora(name) is not None:
                raise APIError(f"The lora adapter '{name}' has already been loaded.",
                               param="lora_name")
            await self.engine.add_lora(LoRARequest(name, self._next_lora_id(), path,
                                                   base_model_name))

    async def unload_lora(self, name: str) -> None:
        """Forgets an adapter; 404 if none has this name."""
        async with self._lora_lock:
            lora = self.find_lora(name)
            if lora is None:
                raise APIError(f"The lora adapter '{name}' cannot be found.", 404,
                               type="NotFoundError", param="lora_name", code=404)
            await self.engine.remove_lora(lora.lora_int_id)

    def _next_lora_id(self) -> int:
        """1, 2, ... and never one used before: an id keys its adapter's prefix-cache entries,
        so a reused id could serve KV computed with an unloaded adapter."""
        self._last_lora_id = max([self._last_lora_id, *(lora.lora_int_id for lora in self.loras)])
        self._last_lora_id += 1
        return self._last_lora_id

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(
                f"{param}: token ids must be in [0, {vocab}), got {bad[:5]}", param=param
            )
