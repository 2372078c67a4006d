"""kvpage-runtime: models, loaders, sampler, engine, the offline LLM API and the server."""

from kvpage_runtime.engine import (
    LLM,
    AsyncLLM,
    CompletionOutput,
    EngineConfig,
    EngineStats,
    Logprob,
    RequestMetrics,
    RequestOutput,
)
from kvpage_runtime.errors import InvalidRequestError, KVPageError
from kvpage_runtime.sampling import SamplingParams

__all__ = ["LLM", "AsyncLLM", "CompletionOutput", "EngineConfig", "EngineStats", "InvalidRequestError",
           "KVPageError", "Logprob", "RequestMetrics", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
