"""The LoRA side of a linear layer: every slot's adapter stacked, applied to a mixed batch.

A layer of several shards (fused q/k/v, gate/up) stacks each shard's A along the rank
(``a`` [max_loras, shards * max_rank, in_features]) and places each shard's B in its own
block of rows and columns (``b`` [max_loras, out_features, shards * max_rank], zero
elsewhere), so that one shrink and one expand serve the whole layer, shards an adapter does
not adapt staying zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpage_kernels import lora_expand, lora_shrink

from kvpage_runtime.errors import LoRAAdapterError


@dataclass
class LoRABatch:
    """What every LoRA layer reads for the step being run: the adapter slot of each token
    (int32 [tokens], -1: none), or None when no token of the step has an adapter."""

    token_slots: torch.Tensor | None = None


class LoRALayer:
    """Slots of stacked adapter weights for one ``Linear``; ``add`` adds the step's deltas."""

    def __init__(self, path: str, input_size: int, output_sizes: list[int], max_loras: int,
                 max_rank: int, dtype: torch.dtype, device: torch.device, batch: LoRABatch):
        self.path = path
        self.input_size = input_size
        self.output_sizes = output_sizes
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.max_rank = max_rank
        ranks = len(output_sizes) * max_rank
        self.a = torch.zeros(max_loras, ranks, input_size, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, sum(output_sizes), ranks, dtype=dtype, device=device)
        self.batch = batch

    def check(self, shard: int, a: torch.Tensor, b: torch.Tensor, adapter: str) -> None:
        size = self.output_sizes[shard]
        if a.shape[1] != self.input_size or b.shape[0] != size:
            raise LoRAAdapterError(
                f"adapter {adapter!r}: shard {shard} of {self.path} has lora_A {tuple(a.shape)} "
                f"and lora_B {tuple(b.shape)}, but the model's layer takes {self.input_size} "
                f"inputs to {size} outputs (an adapter of another model?)")

    def set_slot(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Slot ``slot`` holds ``shards`` (shard -> (A, B), checked); the others are zero."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for shard, (a, b) in shards.items():
            rank, size = a.shape[0], self.output_sizes[shard]
            first = shard * self.max_rank
            self.a[slot, first : first + rank] = a
            rows = slice(self.offsets[shard], self.offsets[shard] + size)
            self.b[slot, rows, first : first + rank] = b

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += the LoRA delta of each token of x with an adapter (nothing when none has)."""
        slots = self.batch.token_slots
        if slots is not None:
            lora_expand(y, lora_shrink(x, self.a, slots), self.b, slots)
