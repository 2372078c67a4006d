"""The LoRA side of a linear layer: every slot's adapter stacked, applied to a mixed batch.

A layer of several shards (fused q/k/v, gate/up) stacks each shard's A along the rank
(``a`` [max_loras, shards * max_rank, in_features]), so that one shrink serves the whole
layer, and keeps each shard's B apart (``b[shard]`` [max_loras, shard_out_features,
max_rank]), expanded into that shard's columns of the output; shards an adapter does not
adapt stay zero. Ranks below ``max_rank`` are padded with zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpage_kernels import lora_expand, lora_shrink

from kvpage_runtime.errors import LoRAAdapterError
from kvpage_runtime.layers.linear import Linear


@dataclass
class LoRABatch:
    """What every LoRA layer reads for the step being run: the adapter slot of each token
    (int32 [tokens], -1: none), or None when no token of the step has an adapter."""

    token_slots: torch.Tensor | None = None


class LoRALayer:
    """Slots of stacked adapter weights for one ``Linear``; ``add`` adds the step's deltas."""

    def __init__(self, path: str, linear: Linear, max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, batch: LoRABatch):
        self.path = path
        self.input_size = linear.input_size
        self.output_sizes = linear.output_sizes
        self.offsets = linear.shard_offsets
        self.max_rank = max_rank
        ranks = len(self.output_sizes) * max_rank
        self.a = torch.zeros(max_loras, ranks, self.input_size, dtype=dtype, device=device)
        self.b = [torch.zeros(max_loras, size, max_rank, dtype=dtype, device=device)
                  for size in self.output_sizes]
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
        for b in self.b:
            b[slot].zero_()
        for shard, (a, b) in shards.items():
            rank, first = a.shape[0], shard * self.max_rank
            self.a[slot, first : first + rank] = a
            self.b[shard][slot, :, :rank] = b

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += the LoRA delta of each token of x with an adapter (nothing when none has)."""
        slots = self.batch.token_slots
        if slots is None:
            return
        h = lora_shrink(x, self.a, slots)
        for shard, (offset, size) in enumerate(zip(self.offsets, self.output_sizes, strict=True)):
            ranks = slice(shard * self.max_rank, (shard + 1) * self.max_rank)
            lora_expand(y[:, offset : offset + size], h[:, ranks], self.b[shard], slots)
