"""Hugging Face config.json -> ModelConfig."""

from __future__ import annotations

from typing import Any

import torch

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.errors import ModelLoadError, UnsupportedModelError
from kvpage_runtime.models.registry import model_class

_QKV_BIAS_ARCHITECTURES = {"Qwen2ForCausalLM"}


def _family_options(architecture: str, raw: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig``'s family options (see there) that ``architecture`` sets."""
    if architecture == "Qwen3ForCausalLM":
        return {"qk_norm": "head"}
    if architecture == "Qwen3MoeForCausalLM":
        num_layers, skipped = raw["num_hidden_layers"], set(raw.get("mlp_only_layers") or [])
        step = raw.get("decoder_sparse_step", 1)
        return {"qk_norm": "head",  # transformers 5 writes num_experts as num_local_experts
                "num_experts": raw.get("num_experts") or raw["num_local_experts"],
                "moe_intermediate_size": raw["moe_intermediate_size"],
                "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
                "moe_layers": [i for i in range(num_layers)
                               if i not in skipped and (i + 1) % step == 0]}
    if architecture == "Olmo2ForCausalLM":
        return {"qk_norm": "full", "post_norm": True}
    if architecture == "GraniteForCausalLM":
        return {"embedding_multiplier": raw.get("embedding_multiplier", 1.0),
                "residual_multiplier": raw.get("residual_multiplier", 1.0),
                "attention_multiplier": raw.get("attention_multiplier", 1.0),
                "logits_scaling": raw.get("logits_scaling", 1.0)}
    return {}


def model_config_from_hf(raw: dict[str, Any], dtype: torch.dtype) -> ModelConfig:
    architecture = _architecture(raw)
    model_class(architecture)  # fails early, listing the supported architectures
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(
            f"hidden_act {raw['hidden_act']!r} is not supported (only 'silu')"
        )
    if architecture not in _QKV_BIAS_ARCHITECTURES and (
        raw.get("attention_bias") or raw.get("mlp_bias")
    ):
        raise UnsupportedModelError(f"{architecture} with attention_bias/mlp_bias is not supported")
    try:
        num_heads = raw["num_attention_heads"]
        theta, scaling = _rope(raw)
        fields = dict(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            intermediate_size=raw["intermediate_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window(raw),
            attention_bias=architecture in _QKV_BIAS_ARCHITECTURES,
            num_experts=raw.get("num_local_experts", 0),
            num_experts_per_tok=raw.get("num_experts_per_tok", 0),
            dtype=dtype,
        )
        return ModelConfig(**{**fields, **_family_options(architecture, raw)})
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}") from None


def _architecture(raw: dict[str, Any]) -> str:
    architectures = raw.get("architectures") or []
    if not architectures:
        raise ModelLoadError(
            "config.json names no architecture (the 'architectures' field is empty)"
        )
    return architectures[0]


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either ``rope_parameters`` (transformers 5) or ``rope_scaling``."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    partial = params.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedModelError(
            f"partial_rotary_factor {partial} is not supported (RoPE over the whole head only)")
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default":
        return theta, None
    if "original_max_position_embeddings" in raw:  # Phi-3 keeps it beside the scaling
        params["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
    return theta, {"rope_type": rope_type, **params}


def _sliding_window(raw: dict[str, Any]) -> int | None:
    """The window when every layer slides, None when none does; mixed layouts are unsupported."""
    window = raw.get("sliding_window")
    if window is None:
        return None
    num_layers = raw["num_hidden_layers"]
    if "layer_types" in raw and raw["layer_types"]:
        sliding = sum(kind == "sliding_attention" for kind in raw["layer_types"])
    elif "use_sliding_window" in raw:  # Qwen2: layers from max_window_layers on slide
        first = (
            raw.get("max_window_layers", num_layers) if raw["use_sliding_window"] else num_layers
        )
        sliding = max(0, num_layers - first)
    else:
        sliding = num_layers
    if sliding == 0:
        return None
    if sliding == num_layers:
        return window
    raise UnsupportedModelError(
        "models mixing sliding-window and full-attention layers are not supported"
    )
