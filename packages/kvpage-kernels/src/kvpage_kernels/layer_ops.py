"""The elementwise ops of a Llama layer, the packed linear and embedding lookup, the greedy
argmax, the experts' routing and the LoRA ops, in plain torch (any device).

They are what every backend serves unless it has its own (the cpu backend fuses them);
``ops`` dispatches to a backend's version when it defines one, else to these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import KernelInputError
from .packed_weight import PackedWeight, QuantizedPanels
from .quantized import int8_rounded


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


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """gelu(gate, approximate="tanh") * up for x = [gate | up] along the last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first 2 * half values of each head of x [tokens, heads, head_dim] in the
    half-rotation layout (as Hugging Face Llama): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin),
    with cos, sin [tokens, (1,) half]; the values past them pass unchanged (partial rotary)."""
    half = cos.shape[-1]
    cos, sin = cos.reshape(x.shape[0], 1, half), sin.reshape(x.shape[0], 1, half)
    x1, x2, rest = x.split([half, half, x.shape[-1] - 2 * half], dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def packed_linear(x: torch.Tensor, packed: PackedWeight | QuantizedPanels,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear on the weight unpacked (and dequantized, then rounded to a 16-bit x's dtype),
    in fp32, which copies it at each call: for backends with no GEMM of their own on the
    packed layout (or on 16-bit inputs)."""
    weight = packed.dense_weight()
    if isinstance(packed, QuantizedPanels) and packed.int8_activations:
        x = int8_rounded(x, packed.group_size, packed.input_order)
    if x.dtype != torch.float32:
        weight, x = weight.to(x.dtype).float(), x.float()
    return F.linear(x, weight, bias)


def embedding_rows(packed: PackedWeight | QuantizedPanels, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the packed weight in fp32, unpacked (and dequantized) in torch."""
    if ids.numel() and ids.device.type == "cpu":
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= packed.out_features:
            raise ids_outside_table(ids, packed.out_features)
    return packed.dense_rows(ids)


def ids_outside_table(ids: torch.Tensor, num_rows: int) -> KernelInputError:
    """The error for ``ids`` that fall outside a table of num_rows rows."""
    return KernelInputError(f"ids must lie in [0, {num_rows}) (out_features of packed), got "
                            f"values in [{int(ids.min())}, {int(ids.max())}]")


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise index of the first maximum (max().indices: several times faster than argmax
    on the CPU)."""
    return x.max(dim=-1).indices


def route_experts(logits: torch.Tensor, top_k: int,
                  normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32, torch.topk, then each row's weights divided by their sum."""
    weights, experts = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def _slot_rows(token_slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(slot, indices of its rows) for each adapter slot present, -1 left out."""
    slots = token_slots.long()
    present = sorted(set(slots.tolist()) - {-1})
    return [(slot, torch.nonzero(slots == slot).flatten()) for slot in present]


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Rows grouped by slot: one matmul per adapter present in the batch."""
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for slot, rows in _slot_rows(token_slots):
        h[rows] = x[rows].float() @ lora_a[slot].float().T
    return h


def lora_expand(out: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor,
                token_slots: torch.Tensor) -> None:
    for slot, rows in _slot_rows(token_slots):
        out[rows] = (out[rows].float() + h[rows] @ lora_b[slot].float().T).to(out.dtype)
