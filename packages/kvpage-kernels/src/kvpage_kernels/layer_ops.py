"""The elementwise ops of a Llama layer, the packed linear and the greedy argmax, in plain
torch (any device).

They are what every backend serves unless it has its own (the cpu backend fuses them);
``ops`` dispatches to a backend's version when it defines one, else to these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packed_weight import PackedWeight, QuantizedPanels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """RMSNorm with Hugging Face's numerics (fp32 statistics; in half types the normalized
    value is rounded before the weight scales it), after adding `residual` when given:
    returns norm(x) or (norm(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
    shape = (x.shape[-1],)
    if x.dtype == torch.float32:
        normed = F.rms_norm(x, shape, weight, eps)
    else:
        normed = F.rms_norm(x.float(), shape, None, eps).to(x.dtype) * weight
    return normed if residual is None else (normed, x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [tokens, heads, head_dim] in the half-rotation layout (as Hugging Face Llama):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); cos, sin [tokens, (1,) head_dim // 2]."""
    cos, sin = cos.reshape(x.shape[0], 1, -1), sin.reshape(x.shape[0], 1, -1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def packed_linear(x: torch.Tensor, packed: PackedWeight | QuantizedPanels,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear on the weight unpacked (and dequantized, then rounded to a 16-bit x's dtype),
    in fp32, which copies it at each call: for backends with no GEMM of their own on the
    packed layout (or on 16-bit inputs)."""
    weight = packed.dense_weight()
    if x.dtype != torch.float32:
        weight, x = weight.to(x.dtype).float(), x.float()
    return F.linear(x, weight, bias)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise index of the first maximum (max().indices: several times faster than argmax
    on the CPU)."""
    return x.max(dim=-1).indices
