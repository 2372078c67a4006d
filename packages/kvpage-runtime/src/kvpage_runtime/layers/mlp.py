"""Gated feed-forward block (SiLU, or GELU with the tanh approximation) with gate and up
projections fused into one matmul."""

from __future__ import annotations

from collections.abc import Callable

import torch
from kvpage_kernels import gelu_tanh_and_mul, silu_and_mul
from torch import nn

from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.errors import UnsupportedModelError
from kvpage_runtime.layers.linear import Linear, Parallel
from kvpage_runtime.layers.quantization import LinearMethods

# Hugging Face's ``hidden_act`` names -> the gated activation over [gate | up].
GATED_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu_and_mul,
    "gelu_pytorch_tanh": gelu_tanh_and_mul,
}


def gated_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return GATED_ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"hidden_act {name!r} is not supported; supported: {', '.join(GATED_ACTIVATIONS)}"
        ) from None


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), act SiLU or ``activation``; ``gate_up_proj`` stacks the gate (shard 0) and up (shard 1)
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
        activation: str = "silu",
    ) -> None:
        super().__init__()
        self.act_and_mul = gated_activation(activation)
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
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))
