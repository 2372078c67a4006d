"""GPTQ checkpoints (AutoGPTQ / GPTQModel: 4 or 8 bits, symmetric or not, act-order or not,
``checkpoint_format`` gptq or gptq_v2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from kvpage_kernels import QuantizedWeight

from kvpage_runtime.errors import UnsupportedModelError
from kvpage_runtime.layers.quantization.config import DecoderLinearsQuantized
from kvpage_runtime.layers.quantization.formats import gptq_weight

BITS = (4, 8)
GROUP_SIZES = (-1, 32, 64, 128)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQConfig(DecoderLinearsQuantized):
    """``desc_act`` (act-order) checkpoints need each layer's ``g_idx``; without act-order,
    inputs come group after group and ``g_idx`` (which says so) is not read. Symmetric and
    asymmetric checkpoints both store their zero points, so ``sym`` changes nothing here."""

    bits: int
    group_size: int
    desc_act: bool
    checkpoint_format: str = "gptq"
    modules_to_not_convert: tuple[str, ...] = ()


    @classmethod
    def from_hf(cls, settings: dict[str, Any]) -> GPTQConfig:
        bits = settings.get("bits")
        if bits not in BITS:
            raise UnsupportedModelError(f"GPTQ with {bits} bits is not supported (4 or 8 are)")
        group_size = settings.get("group_size", -1)
        if group_size not in GROUP_SIZES:
            raise UnsupportedModelError(
                f"GPTQ group_size {group_size} is not supported "
                f"({', '.join(map(str, GROUP_SIZES))} are)")
        for flag in ("sym", "desc_act"):
            if not isinstance(settings.get(flag, False), bool):
                raise UnsupportedModelError(f"GPTQ setting {flag} must be true or false, got "
                                            f"{settings[flag]!r}")
        checkpoint_format = settings.get("checkpoint_format", "gptq")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise UnsupportedModelError(
                f"GPTQ checkpoint_format {checkpoint_format!r} is not supported "
                f"({', '.join(CHECKPOINT_FORMATS)} are)")
        if settings.get("lm_head"):
            raise UnsupportedModelError("GPTQ with a quantized lm_head is not supported")
        return cls(bits, group_size, settings.get("desc_act", False), checkpoint_format,
                   tuple(settings.get("modules_to_not_convert") or ()))

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales") + (("g_idx",) if self.desc_act else ())

    @property
    def ignored_names(self) -> tuple[str, ...]:
        return () if self.desc_act else ("g_idx",)

    def convert(
        self, tensors: dict[str, torch.Tensor], shard: int, shape: tuple[int, int]
    ) -> QuantizedWeight:
        return gptq_weight(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                           tensors.get("g_idx"), self.bits, self.group_size,
                           self.checkpoint_format)
