"""Hugging Face architecture name -> kvpage model class."""

from __future__ import annotations

from torch import nn

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.errors import UnsupportedModelError
from kvpage_runtime.layers.linear import LinearMethod
from kvpage_runtime.models.llama import LlamaForCausalLM
from kvpage_runtime.models.mixtral import MixtralForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}
SUPPORTED_ARCHITECTURES = tuple(_MODELS)


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return _MODELS[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None


def build_model(config: ModelConfig, device=None, method: LinearMethod | None = None) -> nn.Module:
    """An uninitialized model for ``config`` (weights still to be loaded)."""
    return model_class(config.architecture)(config, device, method)
