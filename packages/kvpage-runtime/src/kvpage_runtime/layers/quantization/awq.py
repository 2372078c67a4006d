"""AWQ checkpoints (AutoAWQ's ``gemm`` version: 4 bits, zero points, groups of 32 to 128)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from kvpage_kernels import QuantizedWeight

from kvpage_runtime.errors import UnsupportedModelError
from kvpage_runtime.layers.quantization.config import DecoderLinearsQuantized, setting
from kvpage_runtime.layers.quantization.formats import awq_weight

GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class AWQConfig(DecoderLinearsQuantized):
    group_size: int
    modules_to_not_convert: tuple[str, ...] = ()

    tensor_names: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales")
    ignored_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_hf(cls, settings: dict[str, Any]) -> AWQConfig:
        version = str(settings.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedModelError(f"AWQ version {version!r} is not supported (gemm is)")
        bits = setting(settings, "bits", "w_bit", default=4)
        if bits != 4:
            raise UnsupportedModelError(f"AWQ with {bits} bits is not supported (4 is)")
        if not settings.get("zero_point", True):
            raise UnsupportedModelError("AWQ without zero points (zero_point: false) is not "
                                        "supported")
        group_size = setting(settings, "group_size", "q_group_size", default=128)
        if group_size not in GROUP_SIZES:
            raise UnsupportedModelError(
                f"AWQ group_size {group_size} is not supported "
                f"({', '.join(map(str, GROUP_SIZES))} are)")
        return cls(group_size, tuple(settings.get("modules_to_not_convert") or ()))

    def convert(
        self, tensors: dict[str, torch.Tensor], shard: int, shape: tuple[int, int]
    ) -> QuantizedWeight:
        return awq_weight(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                          self.group_size)
