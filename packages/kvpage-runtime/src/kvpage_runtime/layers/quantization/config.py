"""Which layers of a checkpoint are quantized, and how.

A ``QuantizationConfig`` (AWQ and GPTQ from config.json's ``quantization_config``, GGUF from
a file's tensor types) gives each layer its ``LinearMethod``; ``LinearMethods`` asks it for
every layer a model builds, by the layer's name, and falls back to the dense method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from kvpage_runtime.errors import ModelLoadError, UnsupportedModelError
from kvpage_runtime.layers.linear import LinearMethod, checkpoint_parts
from kvpage_runtime.layers.quantization.low_bit import LowBitLinearMethod

# What ``quantization=`` may ask for: a format, or "none" for the dense load of a GGUF file
# (its tensors dequantized to the model dtype at load).
QUANTIZATION_METHODS = ("awq", "gptq", "gguf")
DENSE_LOAD = "none"
QUANTIZATION_CHOICES = (*QUANTIZATION_METHODS, DENSE_LOAD)


def check_requested(requested: str | None, found: str) -> None:
    """Raise unless ``requested`` (a ``quantization=`` option) is None or ``found``, the
    quantization of the checkpoint (``DENSE_LOAD`` for a dense one)."""
    if requested is not None and requested not in QUANTIZATION_CHOICES:
        raise UnsupportedModelError(
            f"quantization method {requested!r} is not supported "
            f"({', '.join(QUANTIZATION_METHODS)} are; {DENSE_LOAD!r} loads a GGUF file dense)")
    if requested is not None and requested != found:
        what = "not quantized" if found == DENSE_LOAD else found
        raise ModelLoadError(f"quantization={requested!r} was asked for, but the checkpoint is {what}")


class QuantizationConfig(Protocol):
    def linear_method(self, layer: str, parts: list[str]) -> LinearMethod | None:
        """The method of linear layer ``layer``, whose shards are the checkpoint modules
        ``parts``; None where the checkpoint keeps it dense."""

    def table_method(self, name: str) -> LinearMethod | None:
        """The method of the embedding table or LM head ``name``; None where it is dense."""


class LinearMethods:
    """Each layer's ``LinearMethod``, chosen by its name in the model (``model.layers.0.
    self_attn.qkv_proj``): what ``quantization`` says, dense where it says nothing. ``stacked``
    is the model's map of checkpoint projections to fused layers (see ``checkpoint_parts``)."""

    def __init__(
        self,
        quantization: QuantizationConfig | None = None,
        stacked: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        self.quantization = quantization
        self.stacked = stacked or {}

    def linear(self, name: str) -> LinearMethod | None:
        if self.quantization is None:
            return None
        return self.quantization.linear_method(name, checkpoint_parts(name, self.stacked))

    def table(self, name: str) -> LinearMethod | None:
        return None if self.quantization is None else self.quantization.table_method(name)


class DecoderLinearsQuantized:
    """What AWQ and GPTQ checkpoints quantize: every linear layer of the decoder layers but
    those ``modules_to_not_convert`` names; embeddings and the LM head stay dense. The
    subclasses (dataclasses with that field) are the ``LowBitFormat`` of their layers."""

    modules_to_not_convert: tuple[str, ...]

    def linear_method(self, layer: str, parts: list[str]) -> LinearMethod | None:
        if left_dense(layer, parts, self.modules_to_not_convert):
            return None
        return LowBitLinearMethod(self, layer, parts)

    def table_method(self, name: str) -> LinearMethod | None:
        return None


def is_not_converted(module: str, modules_to_not_convert: Sequence[str]) -> bool:
    """Whether an entry of ``modules_to_not_convert`` names ``module`` or a module above it,
    whole dotted components only ("gate" names ``mlp.gate``, not ``mlp.gate_proj``)."""
    return any(f".{entry}." in f".{module}." for entry in modules_to_not_convert)


def left_dense(
    layer: str, parts: list[str], modules_to_not_convert: Sequence[str]
) -> bool:
    """True when every part of ``layer`` is left dense, False when none is; a fused layer
    with parts of both kinds is refused."""
    dense = [part for part in parts if is_not_converted(part, modules_to_not_convert)]
    if dense and len(dense) < len(parts):
        raise UnsupportedModelError(
            f"{layer}: modules_to_not_convert leaves {', '.join(dense)} dense but not the "
            f"other parts of this fused layer")
    return bool(dense)


def setting(settings: dict[str, Any], *names: str, default: Any = None) -> Any:
    """The first of ``names`` present in ``settings`` (formats spell some settings two ways)."""
    for name in names:
        if name in settings:
            return settings[name]
    return default
