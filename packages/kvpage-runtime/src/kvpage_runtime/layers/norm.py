"""RMSNorm with Hugging Face's numerics (statistics in fp32; in half types the normalized value
is rounded before the weight scales it)."""

from __future__ import annotations

import torch
from kvpage_kernels import rms_norm
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm whose ``forward(x, residual)`` also folds in the residual add that precedes it.

    With a residual, returns ``(norm(x + residual), x + residual)`` so that decoder layers
    carry the running sum without separate add ops. The op is ``kvpage_kernels.rms_norm``
    (one fused pass in fp32 and bf16 on the compiled CPU backend).
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(x, self.weight, self.eps, residual)
