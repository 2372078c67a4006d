"""Hugging Face config.json -> ModelConfig."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.errors import ModelLoadError, UnsupportedModelError
from kvpage_runtime.layers.mlp import gated_activation
from kvpage_runtime.models.registry import model_class

_QKV_BIAS_ARCHITECTURES = {"Qwen2ForCausalLM"}
_GEMMA_ARCHITECTURES = {"Gemma2ForCausalLM", "Gemma3ForCausalLM"}
# transformers' defaults for fields a Gemma config.json may leave out
_GEMMA_DEFAULTS = {
    "Gemma2ForCausalLM": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                          "sliding_window_pattern": 2},
    "Gemma3ForCausalLM": {"attn_logit_softcapping": None, "final_logit_softcapping": None,
                          "sliding_window_pattern": 6},
}


def _family_options(architecture: str, raw: dict[str, Any], dtype: torch.dtype
                    ) -> dict[str, Any]:
    """``ModelConfig``'s family options (see there) that ``architecture`` sets."""
    if architecture in _GEMMA_ARCHITECTURES:
        return _gemma_options(architecture, raw, dtype)
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
        return {"qk_norm": "full", "norm_placement": "post"}
    if architecture == "GraniteForCausalLM":
        return {"embedding_multiplier": raw.get("embedding_multiplier", 1.0),
                "residual_multiplier": raw.get("residual_multiplier", 1.0),
                "attention_multiplier": raw.get("attention_multiplier", 1.0),
                "logits_scaling": raw.get("logits_scaling", 1.0)}
    return {}


def _gemma_options(architecture: str, raw: dict[str, Any], dtype: torch.dtype
                   ) -> dict[str, Any]:
    if raw.get("use_bidirectional_attention"):
        raise UnsupportedModelError(
            f"{architecture} with use_bidirectional_attention (an embedding model) is not "
            "supported: kvpage serves causal language models")
    defaults = _GEMMA_DEFAULTS[architecture]
    options = {
        "norm_placement": "sandwich",
        "norm_offset": 1.0,
        "embedding_multiplier": gemma_embedding_multiplier(raw["hidden_size"], dtype),
        "attention_multiplier": raw.get("query_pre_attn_scalar", 256) ** -0.5,
        "attn_logit_softcapping": raw.get("attn_logit_softcapping",
                                          defaults["attn_logit_softcapping"]),
        "final_logit_softcapping": raw.get("final_logit_softcapping",
                                           defaults["final_logit_softcapping"]),
    }
    if architecture == "Gemma3ForCausalLM":
        options["qk_norm"] = "head"
        options["local_rope_theta"], options["local_rope_scaling"] = _local_rope(raw)
    return options


def gemma_embedding_multiplier(hidden_size: int, dtype: torch.dtype) -> float:
    """sqrt(hidden_size), rounded to ``dtype`` as transformers multiplies Gemma's embeddings
    by it (a tensor of the model dtype)."""
    return float(torch.tensor(hidden_size**0.5, dtype=dtype))


def _local_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Gemma 3's RoPE for the sliding layers: ``rope_parameters["sliding_attention"]``
    (transformers 5), else the plain RoPE of base ``rope_local_base_freq``."""
    per_layer_type = raw.get("rope_parameters") or {}
    if "sliding_attention" in per_layer_type:
        return _rope(raw, per_layer_type["sliding_attention"])
    return raw.get("rope_local_base_freq", 10000.0), None


def model_config_from_hf(raw: dict[str, Any], dtype: torch.dtype) -> ModelConfig:
    architecture = _architecture(raw)
    model_class(architecture)  # fails early, listing the supported architectures
    if architecture == "Gemma3ForConditionalGeneration":
        return _gemma3_language_model(raw, dtype)
    hidden_act = raw.get("hidden_activation") or raw.get("hidden_act") or "silu"
    gated_activation(hidden_act)  # fails early, listing the supported activations
    if architecture not in _QKV_BIAS_ARCHITECTURES and (
        raw.get("attention_bias") or raw.get("mlp_bias")
    ):
        raise UnsupportedModelError(f"{architecture} with attention_bias/mlp_bias is not supported")
    try:
        num_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        per_layer_type = raw.get("rope_parameters") or {}
        theta, scaling = _rope(raw, per_layer_type.get("full_attention"))
        window, window_layers = _sliding_window(raw, architecture)
        fields = dict(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            intermediate_size=raw["intermediate_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            rotary_dim=_rotary_dim(raw, head_dim),
            max_position_embeddings=_context_length(raw, scaling),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=window,
            sliding_window_layers=window_layers,
            hidden_act=hidden_act,
            attention_bias=architecture in _QKV_BIAS_ARCHITECTURES,
            num_experts=raw.get("num_local_experts", 0),
            num_experts_per_tok=raw.get("num_experts_per_tok", 0),
            dtype=dtype,
        )
        return ModelConfig(**{**fields, **_family_options(architecture, raw, dtype)})
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}") from None


def _gemma3_language_model(raw: dict[str, Any], dtype: torch.dtype) -> ModelConfig:
    """The text model of a Gemma 3 multimodal config: its ``text_config``, whose fields left
    out take transformers' defaults (as the 4B-27B checkpoints' configs leave most out)."""
    import transformers

    text = transformers.Gemma3TextConfig(**raw.get("text_config", {})).to_dict()
    config = model_config_from_hf({**text, "architectures": ["Gemma3ForCausalLM"]}, dtype)
    return dataclasses.replace(config, architecture="Gemma3ForConditionalGeneration")


def _architecture(raw: dict[str, Any]) -> str:
    architectures = raw.get("architectures") or []
    if not architectures:
        raise ModelLoadError(
            "config.json names no architecture (the 'architectures' field is empty)"
        )
    return architectures[0]


def _rope(raw: dict[str, Any], params: dict[str, Any] | None = None
          ) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from ``params`` if given (one layer type's), else from either
    ``rope_parameters`` (transformers 5) or ``rope_scaling``."""
    params = dict(params or raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    params.pop("partial_rotary_factor", None)  # read by _rotary_dim
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default":
        return theta, None
    if "original_max_position_embeddings" in raw:  # Phi-3 keeps it beside the scaling
        params["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
    if rope_type == "dynamic":  # transformers grows the base past max_position_embeddings
        params["original_max_position_embeddings"] = raw.get("max_position_embeddings", 2048)
    return theta, {"rope_type": "longrope" if rope_type == "su" else rope_type, **params}


def _rotary_dim(raw: dict[str, Any], head_dim: int) -> int | None:
    """The values of each head RoPE rotates, int(head_dim * partial_rotary_factor) as in
    transformers, or None when it is the whole head."""
    params = raw.get("rope_parameters") or {}
    params = params.get("full_attention", params)
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    factor = 1.0 if factor is None else factor
    if not 0 < factor <= 1:
        raise UnsupportedModelError(f"partial_rotary_factor {factor} is not supported (it "
                                    "must be above 0 and at most 1)")
    rotary_dim = int(head_dim * factor)
    return None if rotary_dim == head_dim else rotary_dim


def _context_length(raw: dict[str, Any], scaling: dict[str, Any] | None) -> int:
    """The context served: max_position_embeddings, times the factor for dynamic NTK, whose
    configs state the pretrained context in it (vLLM serves the same extended context)."""
    length = raw.get("max_position_embeddings", 2048)
    if scaling is not None and scaling["rope_type"] == "dynamic":
        return int(length * scaling["factor"])
    return length


def _sliding_window(raw: dict[str, Any], architecture: str
                    ) -> tuple[int | None, list[int] | None]:
    """(the window, the layers that slide when only some do) from ``sliding_window`` and the
    layers' kinds; (None, None) when no layer slides."""
    window = raw.get("sliding_window")
    if window is None:
        return None, None
    kinds = _layer_types(raw, architecture)
    sliding = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
    if not sliding:
        return None, None
    return window, None if len(sliding) == len(kinds) else sliding


def _layer_types(raw: dict[str, Any], architecture: str) -> list[str]:
    """Each layer's kind, "sliding_attention" or "full_attention": ``layer_types`` where the
    config lists them (transformers 5), else by the rule of the family's older configs."""
    num_layers = raw["num_hidden_layers"]
    if raw.get("layer_types"):
        return list(raw["layer_types"])
    if architecture in _GEMMA_ARCHITECTURES:  # every pattern-th layer attends in full
        pattern = raw.get("sliding_window_pattern",
                          _GEMMA_DEFAULTS[architecture]["sliding_window_pattern"])
        slides = [(i + 1) % pattern != 0 for i in range(num_layers)]
    elif "use_sliding_window" in raw:  # Qwen2: layers from max_window_layers on slide
        first = raw.get("max_window_layers", num_layers) if raw["use_sliding_window"] else num_layers
        slides = [i >= first for i in range(num_layers)]
    else:
        slides = [True] * num_layers
    return ["sliding_attention" if s else "full_attention" for s in slides]
