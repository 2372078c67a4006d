"""kvpage-kernels: PagedAttention and KV-cache ops with swappable backends."""

from .errors import KernelBackendUnavailable, KernelError, KernelInputError
from .ops import (
    BACKENDS,
    argmax,
    bf16_dot_rows,
    copy_blocks,
    embedding_rows,
    gelu_tanh_and_mul,
    lora_expand,
    lora_shrink,
    pack_weight,
    packed_linear,
    paged_attention,
    rms_norm,
    rotary_embedding,
    route_experts,
    select_backend,
    silu_and_mul,
    swap_blocks,
    write_kv,
)
from .packed_weight import PackedWeight, QuantizedPanels
from .quantized import QuantizedWeight, int8_rounded

__all__ = [
    "BACKENDS",
    "KernelBackendUnavailable",
    "KernelError",
    "KernelInputError",
    "PackedWeight",
    "QuantizedPanels",
    "QuantizedWeight",
    "argmax",
    "bf16_dot_rows",
    "copy_blocks",
    "embedding_rows",
    "gelu_tanh_and_mul",
    "int8_rounded",
    "lora_expand",
    "lora_shrink",
    "pack_weight",
    "packed_linear",
    "paged_attention",
    "rms_norm",
    "rotary_embedding",
    "route_experts",
    "select_backend",
    "silu_and_mul",
    "swap_blocks",
    "write_kv",
]
__version__ = "0.1.0"
