"""SiLU-gated feed-forward block with gate and up projections fused into one matmul."""

from __future__ import annotations

import torch
from kvpage_kernels import silu_and_mul
from torch import nn

from kvpage_runtime.layers.linear import Linear, LinearMethod


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); ``gate_up_proj`` stacks the gate (shard 0) and up (shard 1) weights."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        device=None,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(
            hidden_size, [intermediate_size] * 2, dtype=dtype, device=device, method=method
        )
        self.down_proj = Linear(
            intermediate_size, [hidden_size], dtype=dtype, device=device, method=method
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
