"""Dense weights repacked once, after loading, into the layout the CPU's GEMM library reads best.

On the CPU, ``F.linear`` multiplies by a plain row-major weight and every call re-packs its
tiles on the fly. Packing them ahead of time is what makes small-batch (decode) GEMMs fast:
measured for SmolLM2-135M's shapes at 64 rows with weights streamed from memory, MKL-packed
fp32 takes 0.71x the time of ``F.linear`` and oneDNN-packed bf16 0.69x (0.67x at 16 rows).

- fp32: MKL's packed sgemm (``torch.ops.mkl._mkl_linear``). The pack is larger than the
  weight (1.3x for 4096x4096 matrices, up to 9x for small ones), the price of the speed.
- bf16 / fp16: oneDNN's blocked weight format (``torch.ops.mkldnn._linear_pointwise``).

Packs are plain attributes, not parameters: they never enter a state dict, and they are made
last, once the weights are in their final dtype and place (an MKL pack must not be moved).
Set ``KVPAGE_CPU_WEIGHT_PACKING=0`` to multiply by the plain weights instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ENV_VAR = "KVPAGE_CPU_WEIGHT_PACKING"
# The row count the packs are tuned for (a decode batch); any row count is accepted.
BATCH_HINT = 64

PackedLinear = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _mkl_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class MklPackedLinear:
    """``x @ weight.T + bias`` by MKL's packed sgemm; ``mkl_weight`` is the pack (which
    kvpage_kernels' fused decoder multiplies by too)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.mkl_weight = torch.ops.mkl._mkl_reorder_linear_weight(weight, BATCH_HINT)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows == 0:
            return F.linear(x, self.weight, bias)
        return torch.ops.mkl._mkl_linear(x, self.mkl_weight, self.weight, bias, rows)


def _onednn_packed(weight: torch.Tensor) -> PackedLinear:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)

    def linear(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.numel() == 0:
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return linear


def pack_linear_weight(weight: torch.Tensor) -> PackedLinear | None:
    """A packed ``x @ weight.T + bias`` for this CPU, or None where plain ``F.linear`` is used."""
    if weight.device.type != "cpu" or weight.dim() != 2 or os.environ.get(ENV_VAR) == "0":
        return None
    weight = weight.detach()
    if weight.dtype == torch.float32 and _mkl_available():
        return MklPackedLinear(weight)
    if weight.dtype in (torch.bfloat16, torch.float16) and _onednn_available():
        return _onednn_packed(weight)
    return None


def pack_model_weights(model: nn.Module) -> None:
    """Let every module that can (it has ``pack_weights()``) repack its weights for the device."""
    for module in model.modules():
        pack = getattr(module, "pack_weights", None)
        if pack is not None:
            pack()
