"""Quantized weights that stay quantized: AWQ, GPTQ and GGUF low-bit blocks.

``low_bit.LowBitLinearMethod`` is the one ``LinearMethod`` for all of them; a format adds only
a small config (``awq``, ``gptq``, ``gguf``) that parses its settings, names its tensors and
converts them with ``formats``. ``config.LinearMethods`` gives each layer of a model its
method, from the checkpoint's ``QuantizationConfig``.
"""

from kvpage_runtime.layers.quantization.config import (
    DENSE_LOAD,
    QUANTIZATION_CHOICES,
    LinearMethods,
    QuantizationConfig,
)
from kvpage_runtime.layers.quantization.gguf import GGUFQuantization
from kvpage_runtime.layers.quantization.hf import quantization_from_hf
from kvpage_runtime.layers.quantization.low_bit import use_int8_activations

__all__ = [
    "DENSE_LOAD",
    "QUANTIZATION_CHOICES",
    "GGUFQuantization",
    "LinearMethods",
    "QuantizationConfig",
    "quantization_from_hf",
    "use_int8_activations",
]
