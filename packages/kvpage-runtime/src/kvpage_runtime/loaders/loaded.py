"""What every loader returns, and choosing the compute dtype."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from kvpage_kernels.cpu_isa import cpu_flags, cpu_isa, tier_at_least
from torch import nn

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.errors import ModelLoadError


@dataclass
class LoadedModel:
    """A model with its weights in place, and what is needed to talk to it."""

    model: nn.Module
    config: ModelConfig
    tokenizer: Any | None
    generation_config: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: set[int] = field(default_factory=set)
    chat_template: str | None = None


_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX) and kvpage's CPU tier is
    ``avx512`` (``KVPAGE_CPU_ISA`` can lower it, see ``kvpage_kernels.cpu_isa``)."""
    return tier_at_least(cpu_isa(), "avx512") and _cpu_has_bf16_instructions()


@functools.cache
def _cpu_has_bf16_instructions() -> bool:
    if "AMX" in torch.backends.cpu.get_cpu_capability():
        return True
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(
    dtype: str | torch.dtype, device: torch.device | str, low_bit: bool = False
) -> torch.dtype:
    """``"auto"`` is bf16 on CUDA and on CPUs with native bf16 (``cpu_has_native_bf16``), else
    fp32: where bf16 would be emulated, fp32 is faster. A model with ``low_bit`` weights gets
    fp32 on every CPU: those are multiplied in fp32 anyway, and fp32 activations spare the
    conversions and let decode steps run through the fused decoder stack."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        on_cuda = torch.device(device).type == "cuda"
        native = on_cuda or (cpu_has_native_bf16() and not low_bit)
        return torch.bfloat16 if native else torch.float32
    else:
        resolved = _DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ModelLoadError(
            f"unsupported dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'"
        )
    return resolved
