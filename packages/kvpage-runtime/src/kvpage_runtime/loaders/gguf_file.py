"""Reading a GGUF file: metadata -> ModelConfig, tensors -> Hugging Face-named arrays
(dequantized, or the raw blocks of those that stay quantized)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.errors import ModelLoadError, UnsupportedModelError

# llama.cpp architecture -> Hugging Face architecture
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# llama.cpp per-block tensor name -> Hugging Face name inside model.layers.{i}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "block_sparse_moe.gate",
}
_EXPERT_NAMES = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# tensors llama.cpp stores that transformers does not use
_IGNORED = {"rope_freqs.weight"}


class GGUFModelFile:
    """A parsed GGUF file: its metadata fields and tensor descriptors (data stays memory-mapped)."""

    def __init__(self, path: Path) -> None:
        import gguf

        try:
            self.reader = gguf.GGUFReader(path)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e
        self.path = path
        self.arch = str(self.field("general.architecture"))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.arch}.{key}", default)

    def model_config(self, dtype: torch.dtype) -> ModelConfig:
        experts = self.arch_field("expert_count", 0) or 0
        architecture = _ARCHITECTURES.get(self.arch)
        if architecture is None:
            raise UnsupportedModelError(
                f"GGUF architecture {self.arch!r} is not supported; supported: {', '.join(_ARCHITECTURES)}"
            )
        if experts and self.arch == "llama":
            architecture = "MixtralForCausalLM"
        hidden = self.arch_field("embedding_length")
        num_heads = self.arch_field("attention.head_count")
        if hidden is None or num_heads is None:
            raise ModelLoadError(
                f"{self.path} lacks {self.arch}.embedding_length/attention.head_count metadata"
            )
        return ModelConfig(
            architecture=architecture,
            vocab_size=self.arch_field("vocab_size") or self.tensors["token_embd.weight"].shape[-1],
            hidden_size=hidden,
            num_layers=self.arch_field("block_count"),
            num_heads=num_heads,
            num_kv_heads=self.arch_field("attention.head_count_kv") or num_heads,
            head_dim=self.arch_field("attention.key_length")
            or self.arch_field("rope.dimension_count")
            or hidden // num_heads,
            intermediate_size=self.arch_field("feed_forward_length"),
            rms_norm_eps=float(self.arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self.arch_field("rope.freq_base", 10000.0)),
            rope_scaling=self._rope_scaling(),
            max_position_embeddings=self.arch_field("context_length", 2048),
            tie_word_embeddings="output.weight" not in self.tensors,
            sliding_window=self.arch_field("attention.sliding_window"),
            attention_bias="blk.0.attn_q.bias" in self.tensors,
            num_experts=experts,
            num_experts_per_tok=self.arch_field("expert_used_count", 0) or 0,
            dtype=dtype,
        )

    def _rope_scaling(self) -> dict[str, Any] | None:
        kind = self.arch_field("rope.scaling.type")
        if kind in (None, "none"):
            return None
        if kind != "linear":
            raise UnsupportedModelError(f"GGUF rope scaling {kind!r} is not supported")
        return {"rope_type": "linear", "factor": float(self.arch_field("rope.scaling.factor"))}

    def eos_token_ids(self) -> set[int]:
        keys = (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        )
        return {int(v) for v in (self.field(k) for k in keys) if v is not None}

    def tensor_types(self) -> dict[str, str]:
        """Hugging Face tensor name -> GGML type name (``Q4_1``, ``F32``...) of every tensor."""
        return {hf_name: tensor.tensor_type.name
                for name, tensor in self.tensors.items() if name not in _IGNORED
                for hf_name in self._hf_names(name, _num_experts(tensor))}

    def hf_tensors(
        self, config: ModelConfig, keep_quantized: Callable[[str], bool] = lambda name: False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor renamed, with llama.cpp's Q/K row permutation undone: dequantized to
        fp32, or for names ``keep_quantized`` selects, its raw blocks (uint8 [rows, bytes per
        row]; each row's blocks are its own, so the permutation moves them as they are)."""
        from gguf.quants import dequantize

        permuted = self.arch == "llama"
        for name, tensor in self.tensors.items():
            if name in _IGNORED:
                continue
            num_experts = _num_experts(tensor)
            names = self._hf_names(name, num_experts)
            raw = all(keep_quantized(hf_name) for hf_name in names)
            array = tensor.data if raw else dequantize(tensor.data, tensor.tensor_type)
            parts = array if num_experts else [array]  # experts: stacked along axis 0
            for hf_name, part in zip(names, parts, strict=True):
                if permuted and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                    heads = config.num_heads if "q_proj" in hf_name else config.num_kv_heads
                    part = unpermute_rotary_rows(part, heads)
                # memory-mapped tensors (unquantized or raw blocks) are read-only: copy those
                yield hf_name, torch.from_numpy(part if part.flags.writeable else part.copy())

    def _hf_names(self, name: str, num_experts: int) -> list[str]:
        """The Hugging Face names of GGUF tensor ``name``: one per expert for stacked experts."""
        stem, _, kind = name.rpartition(".")
        if stem in _GLOBAL_NAMES:
            return [f"{_GLOBAL_NAMES[stem]}.{kind}"]
        match = _BLOCK.match(name)
        if match is None:
            raise ModelLoadError(f"GGUF tensor {name!r} is not understood")
        layer, part, kind = match.groups()
        prefix = f"model.layers.{layer}"
        if part in _EXPERT_NAMES:
            return [f"{prefix}.block_sparse_moe.experts.{expert}.{_EXPERT_NAMES[part]}.{kind}"
                    for expert in range(num_experts)]
        if part in _BLOCK_NAMES:
            return [f"{prefix}.{_BLOCK_NAMES[part]}.{kind}"]
        raise ModelLoadError(f"GGUF tensor {name!r} is not understood")


def _num_experts(tensor) -> int:
    """Experts stacked in a GGUF tensor (its outermost dimension, listed last), 0 if none."""
    return int(tensor.shape[-1]) if len(tensor.shape) == 3 else 0


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleaving of Q/K weights (its rotary layout).

    llama.cpp stores, within each head, rows (0, d/2, 1, d/2+1, ...); Hugging Face keeps the
    two halves contiguous.
    """
    half = weight.shape[0] // num_heads // 2
    return (
        weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )
