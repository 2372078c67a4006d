"""Model implementations, selected by the Hugging Face architecture name (see registry)."""

from kvpage_runtime.models.registry import SUPPORTED_ARCHITECTURES, build_model, model_class

__all__ = ["SUPPORTED_ARCHITECTURES", "build_model", "model_class"]
