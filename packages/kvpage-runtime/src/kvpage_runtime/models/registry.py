"""Hugging Face architecture name -> kvpage model class."""

from __future__ import annotations

from torch import nn

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.errors import UnsupportedModelError
from kvpage_runtime.layers.quantization import QuantizationConfig
from kvpage_runtime.models.gemma3 import Gemma3ForConditionalGeneration
from kvpage_runtime.models.llama import LlamaForCausalLM
from kvpage_runtime.models.mixtral import MixtralForCausalLM
from kvpage_runtime.models.phi3 import Phi3ForCausalLM

_MODELS: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Olmo2ForCausalLM": LlamaForCausalLM,
    "GraniteForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Gemma2ForCausalLM": LlamaForCausalLM,
    "Gemma3ForCausalLM": LlamaForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,  # its text model
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}
SUPPORTED_ARCHITECTURES = tuple(_MODELS)


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    try:
        return _MODELS[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None


def build_model(
    config: ModelConfig, device=None, quantization: QuantizationConfig | None = None,
    tp: TensorParallel | None = None,
) -> nn.Module:
    """An uninitialized model for ``config`` (weights still to be loaded); ``quantization``
    (None: dense) says which layers the checkpoint stores in low-bit form, ``tp`` (None: one
    rank) which slice of each layer the model holds."""
    return model_class(config.architecture)(config, device, quantization, tp)
