"""Copying checkpoint tensors (Hugging Face names) into a model, fusing stacked projections."""

from __future__ import annotations

import torch
from torch import nn

from kvpage_runtime.errors import ModelLoadError
from kvpage_runtime.layers.linear import Linear, checkpoint_parts
from kvpage_runtime.layers.weight_copy import copy_weight


class WeightLoader:
    """Routes each checkpoint tensor to its layer and remembers which are still missing.

    ``stacked`` maps a checkpoint projection name (``q_proj``) to the fused module that holds
    it and its shard (``("qkv_proj", 0)``). A ``Linear`` expects, for each shard, the tensors
    its linear method names (``weight``; AWQ's ``qweight``, ``qzeros``, ``scales``; ...), so
    ``...q_proj.qweight`` goes to the fused ``qkv_proj``'s shard 0, and a missing tensor is
    reported by its checkpoint name.
    """

    def __init__(self, model: nn.Module, stacked: dict[str, tuple[str, int]]) -> None:
        self.stacked = stacked
        self.modules = dict(model.named_modules())
        self.pending = self._expected_names()

    def _expected_names(self) -> set[str]:
        names: set[str] = set()
        seen: set[int] = set()
        for path, module in self.modules.items():
            if isinstance(module, Linear):
                names.update(f"{part}.{tensor}" for part in checkpoint_parts(path, self.stacked)
                             for tensor in module.tensor_names())
                continue
            for name, param in module.named_parameters(recurse=False):
                if id(param) not in seen:  # tied weights are loaded once
                    seen.add(id(param))
                    names.add(f"{path}.{name}")
        return names

    def load(self, name: str, tensor: torch.Tensor) -> None:
        path, _, tensor_name = name.rpartition(".")
        parent, _, leaf = path.rpartition(".")
        shard = 0
        if leaf in self.stacked:
            fused, shard = self.stacked[leaf]
            path = f"{parent}.{fused}"
        module = self.modules.get(path)
        if isinstance(module, Linear) and module.accepts(tensor_name):
            module.load(tensor_name, tensor, shard)
        elif module is not None and not isinstance(module, Linear) and hasattr(
                module, tensor_name):
            if hasattr(module, "from_checkpoint"):  # a rank's part of it, a norm's offset
                tensor = module.from_checkpoint(tensor)
            copy_weight(getattr(module, tensor_name).data, tensor, name)
        else:
            raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the model")
        self.pending.discard(name)

    def check_complete(self) -> None:
        if self.pending:
            missing = sorted(self.pending)
            shown = ", ".join(missing[:8]) + (
                f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            )
            raise ModelLoadError(f"checkpoint is missing {len(missing)} weights: {shown}")


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights hold in memory: its parameters (tied ones once) and the packed
    forms its layers multiply by, beside or instead of them (low-bit panels, kvpage's fp32
    panels, MKL's packs; oneDNN's packs, whose size torch does not tell, are left out)."""
    params = {p.data_ptr(): p.nbytes for p in model.parameters()}
    packs = {id(packed): packed.nbytes for m in model.modules()
             if (packed := getattr(m, "packed", None)) is not None and hasattr(packed, "nbytes")}
    return sum(params.values()) + sum(packs.values())
