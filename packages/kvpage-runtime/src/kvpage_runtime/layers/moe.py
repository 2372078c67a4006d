"""Sparse mixture-of-experts block (Mixtral): softmax router, top-k experts, renormalized weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvpage_runtime.layers.linear import Linear


class SparseMoE(nn.Module):
    """Each token goes through its top-k SiLU-gated experts, mixed by renormalized router probabilities.

    Expert weights are stacked: ``w13`` [num_experts, 2 * intermediate, hidden] (gate then up),
    ``w2`` [num_experts, hidden, intermediate]. Tokens are grouped by expert with one sort, so
    the work is one pair of matmuls per expert that received tokens; the expert count per
    expert is read back to the host once per layer.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        dtype: torch.dtype,
        device=None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.intermediate_size = intermediate_size
        self.gate = Linear(hidden_size, [num_experts], dtype=dtype, device=device)
        w13 = torch.empty(
            num_experts, 2 * intermediate_size, hidden_size, dtype=dtype, device=device
        )
        w2 = torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype, device=device)
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)

    def weight_keys(self, path: str) -> list[str]:
        """Checkpoint names this block loads itself (the router ``gate`` is a regular Linear)."""
        return [
            f"{path}.experts.{e}.{proj}"
            for e in range(self.num_experts)
            for proj in ("w1", "w2", "w3")
        ]

    def expert_slot(self, expert: int, proj: str) -> torch.Tensor:
        """Where checkpoint weight ``experts.{expert}.{proj}`` (proj w1=gate, w3=up, w2=down) goes."""
        size = self.intermediate_size
        if proj == "w1":
            return self.w13.data[expert, :size]
        if proj == "w3":
            return self.w13.data[expert, size:]
        if proj == "w2":
            return self.w2.data[expert]
        raise KeyError(proj)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [n, k] and their fp32 weights [n, k], renormalized to sum to 1."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)  # (token, choice) pairs grouped by expert
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        inputs = x.index_select(0, order // self.top_k)
        outputs = []
        start = 0
        for expert, count in enumerate(counts):
            if count:
                gate, up = F.linear(inputs[start : start + count], self.w13[expert]).chunk(
                    2, dim=-1
                )
                outputs.append(F.linear(F.silu(gate) * up, self.w2[expert]))
            start += count
        per_choice = torch.cat(outputs).index_select(
            0, order.argsort()
        )  # back to (token, choice) order
        mixed = per_choice.view(*experts.shape, -1) * weights.unsqueeze(-1)
        return mixed.sum(dim=1).to(x.dtype)
