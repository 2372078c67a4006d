"""kvpage-runtime: models, loaders, sampler, engine, the offline LLM API and the server.

The names below load on first use, so that ``import kvpage_runtime`` (and the ``kvpage``
command, before it knows what to run) does not import torch: environment variables that
torch's thread pools read when it loads, such as ``OMP_WAIT_POLICY``, can still be set.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "LLM": "kvpage_runtime.engine.llm",
    "AsyncLLM": "kvpage_runtime.engine.async_llm",
    "EngineDeadError": "kvpage_runtime.errors",
    "EngineOverloadedError": "kvpage_runtime.errors",
    "RequestFailedError": "kvpage_runtime.errors",
    "EngineConfig": "kvpage_runtime.engine.config",
    "CompletionOutput": "kvpage_runtime.engine.outputs",
    "EngineStats": "kvpage_runtime.engine.outputs",
    "Logprob": "kvpage_runtime.engine.outputs",
    "RequestMetrics": "kvpage_runtime.engine.outputs",
    "RequestOutput": "kvpage_runtime.engine.outputs",
    "SamplingParams": "kvpage_runtime.sampling.params",
    "BeamSearchParams": "kvpage_runtime.sampling.beam_search",
    "BeamSearchOutput": "kvpage_runtime.sampling.beam_search",
    "BeamSearchSequence": "kvpage_runtime.sampling.beam_search",
    "KVPageError": "kvpage_runtime.errors",
    "InvalidRequestError": "kvpage_runtime.errors",
    "ModelLoadError": "kvpage_runtime.errors",
    "UnsupportedModelError": "kvpage_runtime.errors",
    "EngineConfigError": "kvpage_runtime.errors",
    "LoRAAdapterError": "kvpage_runtime.errors",
    "LoRARequest": "kvpage_runtime.lora.request",
}

__all__ = [
    "LLM",
    "AsyncLLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "CompletionOutput",
    "EngineConfig",
    "EngineConfigError",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "InvalidRequestError",
    "KVPageError",
    "LoRAAdapterError",
    "LoRARequest",
    "Logprob",
    "ModelLoadError",
    "RequestFailedError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "UnsupportedModelError",
]

if TYPE_CHECKING:
    from kvpage_runtime.engine.async_llm import AsyncLLM
    from kvpage_runtime.engine.config import EngineConfig
    from kvpage_runtime.engine.llm import LLM
    from kvpage_runtime.engine.outputs import (
        CompletionOutput,
        EngineStats,
        Logprob,
        RequestMetrics,
        RequestOutput,
    )
    from kvpage_runtime.errors import (
        EngineConfigError,
        EngineDeadError,
        EngineOverloadedError,
        InvalidRequestError,
        KVPageError,
        LoRAAdapterError,
        ModelLoadError,
        RequestFailedError,
        UnsupportedModelError,
    )
    from kvpage_runtime.lora.request import LoRARequest
    from kvpage_runtime.sampling.beam_search import (
        BeamSearchOutput,
        BeamSearchParams,
        BeamSearchSequence,
    )
    from kvpage_runtime.sampling.params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvpage_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
