"""EngineConfig: everything the engine needs to start, with the defaults of the offline API."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpage_runtime.distributed.executor import EXECUTOR_BACKENDS
from kvpage_runtime.errors import EngineConfigError
from kvpage_runtime.layers.quantization import QUANTIZATION_CHOICES
from kvpage_runtime.spec_decode.config import SpeculativeConfig

CPU_MAX_MODEL_LEN = 8192


@dataclass
class EngineConfig:
    """Engine settings.

    ``model`` None serves the default model (SmolLM2-135M-Instruct GGUF). ``kv_cache_memory``
    is a byte count, or on a GPU a float fraction of the free device memory; None picks a
    default (see ``engine.kv_budget``). ``max_model_len`` None takes the model's context length,
    capped to 8192 on the CPU. ``scheduling_policy`` is "fcfs" (arrival order) or "priority"
    (each request's ``priority``, lower first, then arrival order; preemption takes the
    lowest priority first).

    ``quantization`` None loads what the checkpoint is: AWQ and GPTQ folders (config.json's
    ``quantization_config``) and the low-bit blocks of GGUF files (Q4_0, Q4_1, Q8_0, as in
    the default model) stay low-bit in memory. "awq", "gptq" or "gguf" insist on that format
    (loading another is an error); "none" loads a GGUF file dense, every tensor dequantized to
    ``dtype`` (the activations' dtype in every case). ``int8_activations`` (off by default)
    rounds the activations of 4-bit layers to int8 in blocks of 32 inputs and multiplies them
    in integers, as llama.cpp does: faster for a few sequences on the CPU, with results that
    differ from the fp32 ones by that rounding (see ``loaders.load_model``).

    ``speculative_config`` (vLLM's): ``{"method": "ngram", "num_speculative_tokens": k,
    "prompt_lookup_max": 4, "prompt_lookup_min": 1}`` or ``{"method": "draft_model",
    "model": path, "num_speculative_tokens": k}``, and ``"disable_by_batch_size"``
    (see ``spec_decode.SpeculativeConfig``); None: no speculative decoding.

    ``enable_lora`` serves PEFT LoRA adapters (``LoRARequest`` per request) over the model:
    ``max_loras`` of them in one step (each a slot of stacked weights), of rank at most
    ``max_lora_rank``, and ``max_cpu_loras`` (default: ``max_loras``) kept loaded in host
    memory, as vLLM's options of the same names.

    ``tensor_parallel_size`` splits every layer over that many ranks (processes, each with its
    shard of the weights and of the KV cache; see ``distributed``), started by
    ``distributed_executor_backend``: "mp" (the default: processes on this machine) or "ray"
    (actors on a Ray cluster). On the CPU the ranks share the cores, each with
    1/``tensor_parallel_size`` of torch's threads; on CUDA each has a GPU.
    """

    model: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | float | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    device: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    scheduling_policy: str = "fcfs"
    quantization: str | None = None
    int8_activations: bool = False
    speculative_config: dict | None = None
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise EngineConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        mem = self.kv_cache_memory
        if mem is not None and (mem <= 0 or (isinstance(mem, float) and mem > 1.0)):
            raise EngineConfigError(
                f"kv_cache_memory must be a positive byte count or a fraction in (0, 1], got {mem}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise EngineConfigError(
                f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise EngineConfigError(
                f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)} or None, got "
                f"{self.quantization!r}")
        for name in ("max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise EngineConfigError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                                    f"({self.max_loras})")
        self._check_parallel()
        if self.speculative_config is not None:
            SpeculativeConfig.from_dict(self.speculative_config)  # refuses a bad one by name
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def _check_parallel(self) -> None:
        size, backend = self.tensor_parallel_size, self.distributed_executor_backend
        if size < 1:
            raise EngineConfigError(f"tensor_parallel_size must be >= 1, got {size}")
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise EngineConfigError(f"distributed_executor_backend must be one of "
                                    f"{', '.join(EXECUTOR_BACKENDS)}, got {backend!r}")
        if size > 1 and self.enable_lora:
            raise EngineConfigError("enable_lora is not supported with tensor_parallel_size > 1")

    def resolve_max_model_len(self, model_max: int) -> int:
        """The context length served: asked for, or the model's (capped on the CPU)."""
        if self.max_model_len is not None:
            return self.max_model_len
        if torch.device(self.device).type == "cpu":
            return min(model_max, CPU_MAX_MODEL_LEN)
        return model_max
