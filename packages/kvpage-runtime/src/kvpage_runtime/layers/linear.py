"""Linear layers whose weight format is delegated to a quantization method.

A ``Linear`` may stack several logical projections along its output (q/k/v, gate/up): each
is a *shard* loaded separately from the checkpoint. How the weight is stored and multiplied
is the ``LinearMethod``'s business, so that int4 methods (AWQ, GPTQ) can replace the dense one
without touching the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kvpage_runtime.layers.packed_gemm import pack_linear_weight
from kvpage_runtime.layers.weight_copy import copy_weight


class LinearMethod(Protocol):
    """How a ``Linear`` stores and applies its weight."""

    def create_weights(
        self, layer: Linear, input_size: int, output_size: int, dtype: torch.dtype, device
    ) -> None:
        """Register the layer's weight parameters (uninitialized)."""

    def load_shard(
        self, layer: Linear, name: str, tensor: torch.Tensor, offset: int, size: int
    ) -> None:
        """Copy checkpoint tensor ``name`` (e.g. "weight") into output rows ``offset:offset+size``."""

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Final layout for the device, once the weights are loaded, cast and placed."""

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias``."""


class UnquantizedLinearMethod:
    """Dense weight [output_size, input_size] in the model dtype, packed for the CPU's GEMM
    library where that is faster (see ``packed_gemm``)."""

    def create_weights(
        self, layer: Linear, input_size: int, output_size: int, dtype: torch.dtype, device
    ) -> None:
        weight = torch.empty(output_size, input_size, dtype=dtype, device=device)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.packed = None  # set by process_weights_after_loading where packing pays

    def load_shard(
        self, layer: Linear, name: str, tensor: torch.Tensor, offset: int, size: int
    ) -> None:
        param = getattr(layer, name)
        copy_weight(param.data[offset : offset + size], tensor, f"{name} shard at {offset}")

    def process_weights_after_loading(self, layer: Linear) -> None:
        layer.packed = pack_linear_weight(layer.weight)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.packed is not None:
            return layer.packed(x, bias)
        return F.linear(x, layer.weight, bias)


class Linear(nn.Module):
    """y = x W^T (+ b), W stacking ``output_sizes`` shards along the output dimension."""

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.shard_offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        self.method = method or UnquantizedLinearMethod()
        self.method.create_weights(self, input_size, self.output_size, dtype, device)
        self.bias = (
            nn.Parameter(
                torch.empty(self.output_size, dtype=dtype, device=device), requires_grad=False
            )
            if bias
            else None
        )

    def load(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        """Load checkpoint tensor ``name`` ("weight", "bias", or a quantized method's names) for one shard."""
        offset, size = self.shard_offsets[shard], self.output_sizes[shard]
        if name == "bias":
            copy_weight(self.bias.data[offset : offset + size], tensor, f"bias shard {shard}")
        else:
            self.method.load_shard(self, name, tensor, offset, size)

    def pack_weights(self) -> None:
        self.method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)
