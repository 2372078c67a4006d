"""SiLU-gated feed-forward block with gate and up projections fused into one matmul."""

from __future__ import annotations

import torch
from kvpage_kernels import silu_and_mul
from torch import nn

from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.layers.linear import Linear, Parallel
from kvpage_runtime.layers.quantization import LinearMethods


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); ``gate_up_proj`` stacks the gate (shard 0) and up (shard 1)
    weights. ``prefix`` is the block's name in the model (its layers' methods are chosen by
    name). Tensor parallel: each rank holds a slice of the intermediate size (gate/up column
    parallel, down row parallel), and ``reduce_results`` False leaves the sum over the ranks
    to the caller (a mixture of experts sums once for all its experts)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        device=None,
        methods: LinearMethods | None = None,
        prefix: str = "mlp",
        tp: TensorParallel | None = None,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        methods = methods or LinearMethods()
        tp = tp or TensorParallel()
        start, self.intermediate_size = tp.split(intermediate_size, "intermediate size")
        part = (start, intermediate_size)
        self.gate_up_proj = Linear(
            hidden_size, [self.intermediate_size] * 2, dtype=dtype, device=device,
            method=methods.linear(f"{prefix}.gate_up_proj"),
            parallel=Parallel.column(tp, [part, part]),
        )
        self.down_proj = Linear(
            self.intermediate_size, [hidden_size], dtype=dtype, device=device,
            method=methods.linear(f"{prefix}.down_proj"),
            parallel=Parallel.row(tp, start, intermediate_size, reduce_results),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
