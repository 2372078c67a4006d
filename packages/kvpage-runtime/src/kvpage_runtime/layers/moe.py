"""Sparse mixture-of-experts block (Mixtral, Qwen3-MoE): softmax router, top-k experts, their
weights renormalized or not (the kernels' ``route_experts``)."""

from __future__ import annotations

import torch
from kvpage_kernels import route_experts
from torch import nn

from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.layers.linear import Linear
from kvpage_runtime.layers.mlp import GatedMLP
from kvpage_runtime.layers.quantization import LinearMethods


class SparseMoE(nn.Module):
    """Each token goes through its top-k SiLU-gated experts, mixed by their router
    probabilities (renormalized to sum to 1 over the k when ``normalize_top_k``).

    Each expert is a ``GatedMLP`` (``experts.{e}.gate_up_proj``, ``experts.{e}.down_proj``), so
    its layers take the linear method the checkpoint quantized them with; the router ``gate``
    is always dense. Tokens are grouped by expert with one sort, so the work is one expert call
    per expert that received tokens; the token count per expert is read back to the host once
    per layer. Tensor parallel: every rank routes (the router is whole on each) and holds a
    slice of every expert's intermediate size; the mixed output is summed over the ranks once.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        dtype: torch.dtype,
        device=None,
        methods: LinearMethods | None = None,
        prefix: str = "mlp",
        tp: TensorParallel | None = None,
        normalize_top_k: bool = True,
    ) -> None:
        super().__init__()
        self.tp = tp or TensorParallel()
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.gate = Linear(hidden_size, [num_experts], dtype=dtype, device=device)
        self.experts = nn.ModuleList(
            GatedMLP(hidden_size, intermediate_size, dtype, device, methods,
                     f"{prefix}.experts.{e}", self.tp, reduce_results=False)
            for e in range(num_experts)
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [n, k] and their fp32 weights [n, k]."""
        return route_experts(self.gate(x), self.top_k, self.normalize_top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)  # (token, choice) pairs grouped by expert
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        inputs = x.index_select(0, order // self.top_k)
        outputs = []
        start = 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count:
                outputs.append(expert(inputs[start : start + count]))
            start += count
        per_choice = torch.cat(outputs).index_select(
            0, order.argsort()
        )  # back to (token, choice) order
        mixed = per_choice.view(*experts.shape, -1) * weights.unsqueeze(-1)
        return self.tp.all_reduce(mixed.sum(dim=1).to(x.dtype))
