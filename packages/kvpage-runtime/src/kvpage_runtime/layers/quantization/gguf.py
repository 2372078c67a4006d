"""GGUF files: which tensors stay in their low-bit blocks (Q4_0, Q4_1, Q8_0), per layer."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
from kvpage_kernels import QuantizedWeight

from kvpage_runtime.layers.linear import LinearMethod
from kvpage_runtime.layers.quantization.formats import gguf_weight
from kvpage_runtime.layers.quantization.low_bit import LowBitLinearMethod

KEPT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # GGML type -> bits of its codes
DENSE_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class GGUFBlocks:
    """The ``LowBitFormat`` of one layer: each shard's tensor ("weight", the raw blocks
    [out_features, bytes per row] as uint8) of GGML type ``types[shard]``."""

    types: tuple[str, ...]

    tensor_names: ClassVar[tuple[str, ...]] = ("weight",)
    ignored_names: ClassVar[tuple[str, ...]] = ()

    def convert(
        self, tensors: dict[str, torch.Tensor], shard: int, shape: tuple[int, int]
    ) -> QuantizedWeight:
        return gguf_weight(tensors["weight"].numpy(), self.types[shard], shape)


class GGUFQuantization:
    """A GGUF file's layers: those whose tensors are all of a kept type, of one bit width
    (the shards of a fused layer are stacked), stay low-bit; the others are dequantized at
    load. ``tensor_types`` maps the file's tensor names, as the model names them
    (``model.layers.0.self_attn.q_proj.weight``), to their GGML type names."""

    def __init__(self, tensor_types: dict[str, str]) -> None:
        self.tensor_types = tensor_types
        self.kept: set[str] = set()  # tensors that stay low-bit, as the model is built

    def linear_method(self, layer: str, parts: list[str]) -> LinearMethod | None:
        types = [self.tensor_types.get(f"{part}.weight") for part in parts]
        if not all(t in KEPT_TYPES for t in types) or len({KEPT_TYPES[t] for t in types}) > 1:
            return None
        self.kept.update(f"{part}.weight" for part in parts)
        return LowBitLinearMethod(GGUFBlocks(tuple(types)), layer, parts)

    def table_method(self, name: str) -> LinearMethod | None:
        return self.linear_method(name, [name])

    def dequantized_types(self) -> Counter[str]:
        """How many tensors of each low-bit type are dequantized at load."""
        return Counter(t for name, t in self.tensor_types.items()
                       if t not in DENSE_TYPES and name not in self.kept)
