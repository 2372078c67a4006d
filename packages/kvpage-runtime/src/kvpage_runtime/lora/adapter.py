"""Reading a PEFT LoRA folder into the runtime's layers: which fused layer and shard each
adapted projection is, its A and its B with the scaling folded in.

Supported: ``peft_type`` LORA with ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
``alpha_pattern``, ``fan_in_fan_out`` and ``bias: none``, on the decoder layers' linear
projections (q/k/v/o, gate/up/down). Anything else that would change the outputs (DoRA,
``modules_to_save``, LoRA biases, adapters on embeddings or the LM head, ...) is refused by
name rather than ignored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from kvpage_runtime.errors import LoRAAdapterError
from kvpage_runtime.lora.request import LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# config fields that change what an adapter computes, and the value kvpage supports
UNSUPPORTED_FIELDS = {
    "use_dora": False, "lora_bias": False, "modules_to_save": None, "layer_replication": None,
    "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
    "alora_invocation_tokens": None, "use_bdlora": None,
}


@dataclass
class LoRAAdapter:
    """A loaded adapter: for each adapted runtime layer (by its path in the model) and shard,
    A [rank, in_features] and B [shard_out_features, rank] scaled by alpha / r (or
    alpha / sqrt(r) with rsLoRA)."""

    request: LoRARequest
    rank: int
    weights: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]


def load_adapter(request: LoRARequest, targets: dict[str, tuple[str, int]],
                 max_rank: int, dtype: torch.dtype) -> LoRAAdapter:
    """Reads ``request``'s folder. ``targets`` maps each adaptable checkpoint projection
    (``model.layers.0.self_attn.q_proj``) to its runtime layer and shard
    (``("model.layers.0.self_attn.qkv_proj", 0)``)."""
    folder = Path(request.lora_path).expanduser()
    config = _read_config(folder, request)
    tensors = _read_weights(folder, request)
    weights: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for module in sorted({name.rsplit(".lora_", 1)[0] for name in tensors}):
        if module not in targets:
            raise LoRAAdapterError(
                f"adapter {request.lora_name!r} adapts {module!r}: only the decoder layers' "
                f"linear projections (q/k/v/o_proj, gate/up/down_proj) can be adapted")
        a, b = _pair(tensors, module, config, request)
        r = a.shape[0]
        if r > max_rank:
            raise LoRAAdapterError(
                f"adapter {request.lora_name!r} has rank {r} (r in {CONFIG_FILE}) at {module!r}, "
                f"above max_lora_rank={max_rank}: raise max_lora_rank")
        scale = _alpha(config, module, r) / (math.sqrt(r) if config.get("use_rslora") else r)
        weights[targets[module]] = (a.to(dtype), (b.float() * scale).to(dtype))
        rank = max(rank, r)
    if not weights:
        raise LoRAAdapterError(f"adapter {request.lora_name!r} holds no LoRA weights")
    return LoRAAdapter(request, rank, weights)


def _read_config(folder: Path, request: LoRARequest) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise LoRAAdapterError(
            f"adapter {request.lora_name!r}: no {CONFIG_FILE} in {str(folder)!r} (a PEFT "
            f"folder from save_pretrained is expected)")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoRAAdapterError(f"adapter {request.lora_name!r}: cannot read {path}: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAAdapterError(f"adapter {request.lora_name!r}: peft_type is "
                               f"{config['peft_type']!r}; only LORA adapters are supported")
    if config.get("bias", "none") != "none":
        raise LoRAAdapterError(f"adapter {request.lora_name!r}: bias is {config['bias']!r}; "
                               "only adapters with bias 'none' are supported")
    for field, default in UNSUPPORTED_FIELDS.items():
        if config.get(field, default) not in (default, [], {}, ()):
            raise LoRAAdapterError(f"adapter {request.lora_name!r}: {field} is "
                                   f"{config[field]!r}, which kvpage does not support")
    return config


def _read_weights(folder: Path, request: LoRARequest) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        bin_hint = " (pickle .bin weights are refused: save with safe_serialization)" if (
            folder / "adapter_model.bin").exists() else ""
        raise LoRAAdapterError(f"adapter {request.lora_name!r}: no {WEIGHTS_FILE} in "
                               f"{str(folder)!r}{bin_hint}")
    tensors = {}
    for name, tensor in load_file(str(path)).items():
        if "lora_embedding_" in name or not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise LoRAAdapterError(f"adapter {request.lora_name!r}: tensor {name!r} is not a "
                                   "LoRA A/B weight of a linear layer (embedding and other "
                                   "adapters are not supported)")
        tensors[name.removeprefix(PREFIX).replace(".weight", "")] = tensor
    return tensors


def _pair(tensors: dict[str, torch.Tensor], module: str, config: dict,
          request: LoRARequest) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
    if a is None or b is None:
        raise LoRAAdapterError(f"adapter {request.lora_name!r}: {module!r} has only one of "
                               "lora_A and lora_B")
    if config.get("fan_in_fan_out"):
        a, b = a.T, b.T
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise LoRAAdapterError(f"adapter {request.lora_name!r}: {module!r} has lora_A "
                               f"{tuple(a.shape)} and lora_B {tuple(b.shape)}, whose ranks differ")
    return a.contiguous(), b.contiguous()


def _alpha(config: dict, module: str, rank: int) -> float:
    """lora_alpha, or the alpha_pattern entry matching the module as PEFT matches them."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config.get("lora_alpha", 8))  # PEFT's default
