"""Multi-LoRA serving: PEFT adapters over one base model, mixed in one batch.

``request`` (LoRARequest), ``adapter`` (reading a PEFT folder), ``layers`` (the stacked
slots of one linear layer and the batched shrink/expand), ``manager`` (registry, host LRU,
slots)."""

from kvpage_runtime.lora.request import LoRARequest

__all__ = ["LoRARequest"]
