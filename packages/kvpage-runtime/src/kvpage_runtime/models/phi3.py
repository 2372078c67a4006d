"""Phi-3 and Phi-4: the Llama layers, from checkpoints that store q/k/v and gate/up fused.

The fused checkpoint tensors are cut into the projections they stack and loaded as those, so
the runtime's own fused layers (and their tensor-parallel slices) take them as any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from kvpage_runtime.errors import UnsupportedModelError
from kvpage_runtime.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._unfused(weights))

    def _unfused(self, weights: Iterable[tuple[str, torch.Tensor]]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        c = self.config
        splits = {"qkv_proj": (("q_proj", "k_proj", "v_proj"), [c.q_size, c.kv_size, c.kv_size]),
                  "gate_up_proj": (("gate_proj", "up_proj"), [c.intermediate_size] * 2)}
        for name, tensor in weights:
            module, _, tensor_name = name.rpartition(".")
            parent, _, leaf = module.rpartition(".")
            if leaf not in splits:
                yield name, tensor
                continue
            if tensor_name not in ("weight", "bias"):
                raise UnsupportedModelError(
                    f"{name}: Phi-3 checkpoints with quantized fused projections are not "
                    "supported (dense weights only)")
            parts, sizes = splits[leaf]
            for part, piece in zip(parts, tensor.split(sizes), strict=True):
                yield f"{parent}.{part}.{tensor_name}", piece
