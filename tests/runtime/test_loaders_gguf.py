"""GGUF name mapping, Q/K un-permutation and expert stacking, on tiny models written as GGUF here.

Each tiny model is saved by transformers, rewritten the way llama.cpp's converter lays it out
(llama.cpp names, rotary row permutation for llama-arch Q/K, experts stacked per layer) and
loaded back: every parameter must equal the one loaded from the safetensors folder.
"""

from __future__ import annotations

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
_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "block_sparse_moe.gate": "ffn_gate_inp",
}
_EXPERTS = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: interleave each head's two rotary halves."""
    half = weight.shape[0] // num_heads // 2
    return (
        weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def gguf_tensors(hf: dict[str, np.ndarray], config, permute: bool) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    experts: dict[str, list[np.ndarray]] = {}
    for name, array in sorted(hf.items(), key=lambda item: _expert_order(item[0])):
        stem, kind = name.rsplit(".", 1)
        if stem == "model.embed_tokens":
            out[f"token_embd.{kind}"] = array
        elif stem == "model.norm":
            out[f"output_norm.{kind}"] = array
        elif stem == "lm_head":
            out[f"output.{kind}"] = array
        else:
            _, _, layer, rest = stem.split(".", 3)
            if ".experts." in rest:
                proj = rest.rsplit(".", 1)[1]
                experts.setdefault(f"blk.{layer}.{_EXPERTS[proj]}.{kind}", []).append(array)
                continue
            if permute and rest in ("self_attn.q_proj", "self_attn.k_proj") and kind == "weight":
                heads = (
                    config.num_attention_heads if "q_proj" in rest else config.num_key_value_heads
                )
                array = llama_cpp_permute(array, heads)
            out[f"blk.{layer}.{_BLOCK[rest]}.{kind}"] = array
    out.update({name: np.stack(parts) for name, parts in experts.items()})
    return out


def _expert_order(name: str) -> tuple:
    """Sort key putting experts.10 after experts.9."""
    parts = name.split(".")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def write_gguf(folder: Path, path: Path, arch: str, config, permute: bool,
               types: dict[str, str] | None = None) -> Path:
    """The model saved in ``folder`` as llama.cpp lays it out; ``types`` (see
    ``quant_helpers.gguf_type``) stores tensors as low-bit blocks, the rest are F32."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "num_local_experts", 0):
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    for name, array in gguf_tensors(
        load_file(folder / "model.safetensors"), config, permute
    ).items():
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
