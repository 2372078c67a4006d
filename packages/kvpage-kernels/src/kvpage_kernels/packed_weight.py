"""The packed weight that ``packed_linear`` multiplies by: a linear layer's weight in panels.

A weight W [out_features, in_features] is laid out in panels of PANEL_WIDTH output columns,
each [in_features, PANEL_WIDTH] with the PANEL_WIDTH weights of one input side by side:
``panels[p, i, j] = W[p * PANEL_WIDTH + j, i]``, zeros past out_features. The cpu backend's
GEMM reads one panel for every row of a batch, a contiguous stream of 64 bytes (fp32) per
input; the layout is the same on every CPU tier. ``unpack`` gives W back exactly, which is
how the reference and torch backends multiply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PANEL_WIDTH = 16  # the cpu backend's kPanelWidth (csrc/cpu_kernels.cpp)
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class PackedWeight:
    """W [out_features, in_features] as panels [ceil(out_features / PANEL_WIDTH),
    in_features, PANEL_WIDTH], fp32 or bf16 (bf16 is widened to fp32 as it is multiplied)."""

    panels: torch.Tensor
    out_features: int
    in_features: int

    @property
    def dtype(self) -> torch.dtype:
        return self.panels.dtype

    @property
    def expected_shape(self) -> tuple[int, int, int]:
        """The shape of ``panels`` for these features."""
        return (-(-self.out_features // PANEL_WIDTH), self.in_features, PANEL_WIDTH)

    def unpack(self) -> torch.Tensor:
        """W [out_features, in_features] (a new tensor)."""
        return self.panels.transpose(1, 2).reshape(-1, self.in_features)[:self.out_features]


def pack(weight: torch.Tensor) -> PackedWeight:
    """``weight`` [out_features, in_features] in panels (on its device, in its dtype)."""
    out_features, in_features = weight.shape
    num_panels = -(-out_features // PANEL_WIDTH)
    padded = weight.new_zeros(num_panels * PANEL_WIDTH, in_features)
    padded[:out_features] = weight
    panels = padded.view(num_panels, PANEL_WIDTH, in_features).transpose(1, 2).contiguous()
    return PackedWeight(panels, out_features, in_features)
