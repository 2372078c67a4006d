"""RMSNorm with Hugging Face's numerics (statistics in fp32; in half types the normalized value
is rounded before the weight scales it)."""

from __future__ import annotations

import torch
from kvpage_kernels import rms_norm
from torch import nn

from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.errors import ModelLoadError


class RMSNorm(nn.Module):
    """RMSNorm whose ``forward(x, residual)`` also folds in the residual add that precedes it.

    With a residual, returns ``(norm(x + residual), x + residual)`` so that decoder layers
    carry the running sum without separate add ops. The op is ``kvpage_kernels.rms_norm``
    (one fused pass in fp32 and bf16 on the compiled CPU backend). With an ``offset`` (Gemma's
    1), the norm scales by offset + the checkpoint's weight, which is what it stores.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device=None,
                 offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.eps = eps
        self.offset = offset

    def from_checkpoint(self, tensor: torch.Tensor) -> torch.Tensor:
        """The weight to store for the checkpoint's ``tensor`` (offset added in fp32)."""
        return tensor if self.offset == 0.0 else tensor.float() + self.offset

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(x, self.weight, self.eps, residual)


class ProjectionRMSNorm(nn.Module):
    """RMSNorm over a whole projection (OLMo 2's query and key norms), of which a
    tensor-parallel rank holds the ``size`` values from ``start`` of ``total``: the sum of
    squares is summed over the ranks, and the rank keeps its slice of the weight."""

    def __init__(self, total: int, start: int, size: int, eps: float, dtype: torch.dtype,
                 device=None, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.total, self.start, self.eps = total, start, eps
        self.tp = tp or TensorParallel()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device),
                                   requires_grad=False)

    def from_checkpoint(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the checkpoint's whole weight."""
        if tensor.shape != (self.total,):
            raise ModelLoadError(f"norm weight of shape {tuple(tensor.shape)}, the model "
                                 f"expects ({self.total},)")
        return tensor.narrow(0, self.start, self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return rms_norm(x, self.weight, self.eps)
        squares = x.float().square().sum(dim=-1, keepdim=True)
        mean = self.tp.all_reduce(squares) / self.total
        return self.weight * (x.float() * torch.rsqrt(mean + self.eps)).to(x.dtype)
