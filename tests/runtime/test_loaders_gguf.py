"""GGUF name mapping, Q/K un-permutation and expert stacking, on tiny models written as GGUF here.

Each tiny model is saved by transformers, rewritten the way llama.cpp's converter lays it out
(the metadata keys it writes for the architecture, tensor names from the gguf package's own
table, rotary row permutation for the converters derived from its LlamaModel, experts stacked
per layer) and loaded back: every parameter must equal the one loaded from the safetensors
folder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from kvpage_runtime.loaders import load_model
from kvpage_runtime.loaders.gguf_file import GGUFModelFile
from kvpage_runtime.models import build_model
from model_helpers import TINY, one_torch_thread, save_tiny_model  # noqa: F401 (fixture)
from quant_helpers import gguf_blocks, gguf_type
from safetensors.numpy import load_file

SMALL = {**TINY, "num_hidden_layers": 2}
_MODEL_ARCH = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
_NORM_SHIFTED = {"gemma2", "gemma3"}  # llama.cpp stores these norms' weights plus one
_EXPERT = re.compile(r"\.experts\.\d+\.")


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: interleave each head's two rotary halves."""
    half = weight.shape[0] // num_heads // 2
    return (
        weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def gguf_tensors(hf: dict[str, np.ndarray], arch: str, config,
                 permute: bool) -> dict[str, np.ndarray]:
    """The checkpoint ``hf`` as llama.cpp's converter writes it for ``arch``: each layer's
    experts stacked into one tensor, then every name looked up in the gguf package's table
    (``TensorNameMap``); Q/K rows permuted where ``permute``."""
    names = gguf.get_tensor_name_map(_MODEL_ARCH[arch], config.num_hidden_layers)
    out: dict[str, np.ndarray] = {}
    experts: dict[str, list[np.ndarray]] = {}
    for name, array in sorted(hf.items(), key=lambda item: _expert_order(item[0])):
        stem, kind = name.rsplit(".", 1)
        if permute and stem.endswith(("q_proj", "k_proj")) and kind == "weight":
            heads = config.num_attention_heads if stem.endswith("q_proj") else (
                config.num_key_value_heads)
            array = llama_cpp_permute(array, heads)
        if arch in _NORM_SHIFTED and stem.endswith("norm"):  # Gemma's converter: weight + 1
            array = array + np.float32(1)
        merged = _EXPERT.sub(".experts.", stem)
        gguf_name = names.get_name(merged)
        assert gguf_name is not None, f"llama.cpp's {arch} has no tensor for {stem}"
        if merged == stem:
            out[f"{gguf_name}.{kind}"] = array
        else:
            experts.setdefault(f"{gguf_name}.{kind}", []).append(array)
    out.update({name: np.stack(parts) for name, parts in experts.items()})
    return out


def _expert_order(name: str) -> tuple:
    """Sort key putting experts.10 after experts.9."""
    parts = name.split(".")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _llama_metadata(writer: gguf.GGUFWriter, config) -> dict[str, np.ndarray]:
    """LlamaModel (Llama, Mistral, Mixtral; Granite's converter derives from it), and the
    divisor of each frequency that it computes for Llama 3.1's rope scaling."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(_head_dim(config))
    rope = config.rope_parameters
    if rope.get("rope_type") != "llama3":
        return {}
    dim, original = _head_dim(config), rope["original_max_position_embeddings"]
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low, high = original / rope["low_freq_factor"], original / rope["high_freq_factor"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        smooth = (original / wavelen - rope["low_freq_factor"]) / (
            rope["high_freq_factor"] - rope["low_freq_factor"])
        factors.append(1.0 if wavelen < high else rope["factor"] if wavelen > low
                       else 1 / ((1 - smooth) / rope["factor"] + smooth))
    return {"rope_freqs.weight": np.array(factors, dtype=np.float32)}


def _granite_metadata(writer: gguf.GGUFWriter, config) -> dict[str, np.ndarray]:
    """GraniteModel: LlamaModel's keys without head_dim, and its multipliers renamed."""
    _llama_metadata(writer, config)
    writer.add_attention_scale(config.attention_multiplier)
    writer.add_embedding_scale(config.embedding_multiplier)
    writer.add_residual_scale(config.residual_multiplier)
    writer.add_logit_scale(config.logits_scaling)
    return {}


def _qwen_metadata(writer: gguf.GGUFWriter, config) -> dict[str, np.ndarray]:
    """TextModel's head_dim (Qwen2, Qwen3, OLMo 2); Qwen2MoeModel's expert size."""
    if "head_dim" in config.to_dict():
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if hasattr(config, "moe_intermediate_size"):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    return {}


def _phi3_metadata(writer: gguf.GGUFWriter, config) -> dict[str, np.ndarray]:
    """Phi3MiniModel: its rotary dimension (partial rotary: Phi-4-mini), original context,
    window (0: none) and LongRoPE factors, which it stores as tensors."""
    partial = config.rope_parameters.get("partial_rotary_factor", 1.0)
    writer.add_rope_dimension_count(int(partial * config.hidden_size) // config.num_attention_heads)
    writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
    writer.add_sliding_window(config.sliding_window or 0)
    rope = config.rope_parameters
    if rope.get("rope_type") != "longrope":
        return {}
    original = config.original_max_position_embeddings
    scale = config.max_position_embeddings / original
    writer.add_rope_scaling_attn_factors(
        np.sqrt(1 + np.log(scale) / np.log(original)) if scale > 1 else 1.0)
    return {"rope_factors_long.weight": np.array(rope["long_factor"], dtype=np.float32),
            "rope_factors_short.weight": np.array(rope["short_factor"], dtype=np.float32)}


def _gemma_metadata(writer: gguf.GGUFWriter, config) -> dict[str, np.ndarray]:
    """Gemma2Model and Gemma3Model: head_dim, the window, Gemma 2's soft-caps, Gemma 3's
    linear rope scaling (of the full layers; the sliding ones keep llama.cpp's base of 1e4)."""
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_sliding_window(config.sliding_window)
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        return {}
    rope = config.rope_parameters["full_attention"]
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    return {}


_ARCH_METADATA: dict[str, Callable[[gguf.GGUFWriter, object], dict[str, np.ndarray]]] = {
    "llama": _llama_metadata,
    "granite": _granite_metadata,
    "qwen2": _qwen_metadata,
    "qwen3": _qwen_metadata,
    "qwen3moe": _qwen_metadata,
    "olmo2": _qwen_metadata,
    "phi3": _phi3_metadata,
    "gemma2": _gemma_metadata,
    "gemma3": _gemma_metadata,
}


def _add_yarn(writer: gguf.GGUFWriter, params: dict) -> None:
    """YaRN as TextModel's set_gguf_parameters writes it: the factor and original context,
    then the attention factor and betas where the config states them."""
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(params["factor"])
    writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
    if "attention_factor" in params:
        writer.add_rope_scaling_yarn_attn_factor(params["attention_factor"])
    if "beta_fast" in params:
        writer.add_rope_scaling_yarn_beta_fast(params["beta_fast"])
    if "beta_slow" in params:
        writer.add_rope_scaling_yarn_beta_slow(params["beta_slow"])


def add_llama_cpp_metadata(writer: gguf.GGUFWriter, arch: str,
                           config) -> dict[str, np.ndarray]:
    """The metadata llama.cpp's converter writes for ``arch``: TextModel's common keys, then
    the architecture's own, and the token list every converter writes (here the words of
    ``model_helpers.word_tokenizer``; only some write the vocabulary size as well). Returns
    the extra tensors it adds (Phi-3's LongRoPE factors)."""
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if "rope_theta" in config.rope_parameters:  # Gemma 3's are per layer type
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if config.rope_parameters.get("rope_type") == "yarn":
        _add_yarn(writer, config.rope_parameters)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    return _ARCH_METADATA[arch](writer, config)


def write_gguf(folder: Path, path: Path, arch: str, config, permute: bool,
               types: dict[str, str] | None = None) -> Path:
    """The model saved in ``folder`` as llama.cpp's converter writes it for ``arch``;
    ``types`` (see ``quant_helpers.gguf_type``) stores tensors as low-bit blocks, the rest
    are F32."""
    writer = gguf.GGUFWriter(str(path), arch)
    extra = add_llama_cpp_metadata(writer, arch, config)
    tensors = gguf_tensors(load_file(folder / "model.safetensors"), arch, config, permute)
    for name, array in {**extra, **tensors}.items():
        qtype = gguf_type(name, types or {})
        if qtype is None:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        else:
            writer.add_tensor(name, gguf_blocks(array, qtype),
                              raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


CASES = {
    "llama": ("llama", transformers.LlamaConfig(**SMALL, tie_word_embeddings=True), True),
    "qwen2": ("qwen2", transformers.Qwen2Config(**SMALL), False),
    "mixtral": (
        "llama",
        transformers.MixtralConfig(**SMALL, num_local_experts=3, num_experts_per_tok=2),
        True,
    ),
}


@pytest.mark.parametrize("family", CASES)
def test_gguf_weights_equal_safetensors(family, tmp_path):
    arch, config, permute = CASES[family]
    folder = save_tiny_model(config, tmp_path / family)
    path = write_gguf(folder, tmp_path / f"{family}.gguf", arch, config, permute)
    reference = load_model(str(folder), dtype="float32")

    gguf_file = GGUFModelFile(path)
    model_config = gguf_file.model_config(torch.float32)
    expected = reference.config
    for field in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        assert getattr(model_config, field) == getattr(expected, field), field
    assert model_config.attention_bias == expected.attention_bias
    assert model_config.tie_word_embeddings == expected.tie_word_embeddings
    assert model_config.num_experts == expected.num_experts
    model = build_model(model_config)
    model.load_weights(gguf_file.hf_tensors(model_config))
    ours, theirs = model.state_dict(), reference.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
