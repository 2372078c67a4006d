"""Model implementations, selected by the Hugging Face architecture name (see registry).

Every model takes ``(config: ModelConfig, device, quantization: QuantizationConfig | None)``,
returns the final hidden states from ``model(batch, kv_caches)`` and logits (model dtype) from
``model.compute_logits(hidden)``, and loads Hugging Face-named tensors with
``model.load_weights(iterable of (name, tensor))``. A new Llama-like family usually needs only
a registry entry and, if its checkpoint names differ, a ``model_name`` override.
"""

from kvpage_runtime.models.registry import SUPPORTED_ARCHITECTURES, build_model, model_class

__all__ = ["SUPPORTED_ARCHITECTURES", "build_model", "model_class"]
