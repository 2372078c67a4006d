"""The quantization of a Hugging Face checkpoint: config.json's ``quantization_config``."""

from __future__ import annotations

from typing import Any

from kvpage_runtime.errors import ModelLoadError, UnsupportedModelError
from kvpage_runtime.layers.quantization.awq import AWQConfig
from kvpage_runtime.layers.quantization.config import (
    DENSE_LOAD,
    QUANTIZATION_METHODS,
    QuantizationConfig,
    check_requested,
)
from kvpage_runtime.layers.quantization.gptq import GPTQConfig

_PARSERS = {"awq": AWQConfig.from_hf, "gptq": GPTQConfig.from_hf}


def quantization_from_hf(raw: dict[str, Any], requested: str | None) -> QuantizationConfig | None:
    """The checkpoint's quantization (config.json ``raw``), None for a dense checkpoint;
    ``requested`` (None: whatever the checkpoint says) must agree with it."""
    settings = raw.get("quantization_config")
    if settings is None:
        check_requested(requested, DENSE_LOAD)
        return None
    if not isinstance(settings, dict):
        raise ModelLoadError("config.json's quantization_config is not an object")
    method = str(settings.get("quant_method", "")).lower()
    if method not in _PARSERS:
        raise UnsupportedModelError(
            f"quantization method {method!r} is not supported "
            f"({', '.join(QUANTIZATION_METHODS)} are)")
    if requested == DENSE_LOAD:
        raise ModelLoadError(
            f"quantization={DENSE_LOAD!r} (a dense load) applies to GGUF files only; this "
            f"{method} checkpoint loads quantized")
    check_requested(requested, method)
    return _PARSERS[method](settings)
