"""Copying checkpoint tensors (Hugging Face names) into a model, fusing stacked projections."""

from __future__ import annotations

import torch
from torch import nn

from kvpage_runtime.errors import ModelLoadError
from kvpage_runtime.layers.linear import Linear
from kvpage_runtime.layers.weight_copy import copy_weight


class WeightLoader:
    """Routes each checkpoint tensor to its parameter and remembers which are still missing.

    ``stacked`` maps a checkpoint projection name (``q_proj``) to the fused module that holds
    it and its shard (``("qkv_proj", 0)``). Modules with a ``weight_keys(path)`` method load
    their own tensors; the caller reports those with ``mark_loaded``.
    """

    def __init__(self, model: nn.Module, stacked: dict[str, tuple[str, int]]) -> None:
        self.stacked = stacked
        self.modules = dict(model.named_modules())
        self.pending = self._expected_keys()

    def _expected_keys(self) -> set[str]:
        keys: set[str] = set()
        seen: set[int] = set()
        for path, module in self.modules.items():
            if hasattr(module, "weight_keys"):
                keys.update(module.weight_keys(path))
                continue
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:  # tied weights are loaded once
                    continue
                seen.add(id(param))
                shards = len(module.output_sizes) if isinstance(module, Linear) else 1
                keys.update(_key(f"{path}.{name}", s, shards) for s in range(shards))
        return keys

    def load(self, name: str, tensor: torch.Tensor) -> None:
        path, _, param_name = name.rpartition(".")
        parent, _, leaf = path.rpartition(".")
        shard = 0
        if leaf in self.stacked:
            fused, shard = self.stacked[leaf]
            path = f"{parent}.{fused}"
        module = self.modules.get(path)
        if module is None or not hasattr(module, param_name):
            raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the model")
        if isinstance(module, Linear):
            module.load(param_name, tensor, shard)
            self.mark_loaded(_key(f"{path}.{param_name}", shard, len(module.output_sizes)))
            return
        copy_weight(getattr(module, param_name).data, tensor, name)
        self.mark_loaded(f"{path}.{param_name}")

    def mark_loaded(self, key: str) -> None:
        self.pending.discard(key)

    def check_complete(self) -> None:
        if self.pending:
            missing = sorted(self.pending)
            shown = ", ".join(missing[:8]) + (
                f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            )
            raise ModelLoadError(f"checkpoint is missing {len(missing)} weights: {shown}")


def _key(name: str, shard: int, num_shards: int) -> str:
    return f"{name}#{shard}" if num_shards > 1 else name
