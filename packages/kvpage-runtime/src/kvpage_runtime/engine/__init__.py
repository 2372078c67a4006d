"""The engine loop and its offline (LLM) and asyncio (AsyncLLM) fronts."""

from kvpage_runtime.engine.async_llm import AsyncLLM, EngineDeadError
from kvpage_runtime.engine.config import EngineConfig
from kvpage_runtime.engine.engine import LLMEngine
from kvpage_runtime.engine.llm import LLM
from kvpage_runtime.engine.outputs import (
    CompletionOutput,
    EngineStats,
    Logprob,
    RequestMetrics,
    RequestOutput,
    StepTimings,
)

__all__ = ["AsyncLLM", "CompletionOutput", "EngineConfig", "EngineDeadError", "EngineStats",
           "LLM", "LLMEngine", "Logprob", "RequestMetrics", "RequestOutput", "StepTimings"]
