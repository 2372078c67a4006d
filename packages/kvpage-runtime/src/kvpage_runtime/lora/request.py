"""LoRARequest: which adapter a request runs with, as vLLM names it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT LoRA adapter: ``lora_name`` (what the server lists and requests select),
    ``lora_int_id`` (a positive integer unique per adapter: the engine's key for its weights
    and its prefix-cache entries), ``lora_path`` (the folder with ``adapter_config.json`` and
    ``adapter_model.safetensors``)."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) \
                or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")

    @property
    def cache_key(self) -> str:
        """The adapter's key in the scheduler and the prefix cache."""
        return str(self.lora_int_id)
