"""RMSNorm, numerically identical to Hugging Face's (statistics in fp32, cast, then scale)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm whose ``forward(x, residual)`` also folds in the residual add that precedes it.

    With a residual, returns ``(norm(x + residual), x + residual)`` so that decoder layers
    carry the running sum without separate add ops.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.eps = eps
        self.shape = (hidden_size,)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        # Hugging Face rounds the normalized value to the model dtype before scaling by the weight.
        return F.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype) * self.weight

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
