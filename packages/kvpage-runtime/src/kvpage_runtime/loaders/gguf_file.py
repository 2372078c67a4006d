"""Reading a GGUF file: metadata -> ModelConfig, tensors -> Hugging Face-named arrays
(dequantized, or the raw blocks of those that stay quantized)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.errors import ModelLoadError, UnsupportedModelError
from kvpage_runtime.loaders.hf_config import gemma_embedding_multiplier


@dataclass(frozen=True)
class _Family:
    """How llama.cpp's converter writes one Hugging Face architecture.

    ``permuted``: Q/K rows interleaved per head (the converters derived from its LlamaModel);
    ``block_names``: per-block tensor names that differ from ``_BLOCK_NAMES``; ``options``:
    the ``ModelConfig`` family options the architecture fixes; ``metadata``: those read from
    ``{arch}.{key}`` -> (option, default where the key is absent, as llama.cpp defaults it);
    ``derived``: those llama.cpp derives from other fields; ``sliding_pattern``: where the
    file has a window, every pattern-th layer attends in full (llama.cpp's fixed pattern for
    the architecture, unless the file states ``attention.sliding_window_pattern``).
    """

    architecture: str
    permuted: bool = False
    block_names: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, tuple[str, Any]] = field(default_factory=dict)
    derived: Callable[[GGUFModelFile, torch.dtype], dict[str, Any]] | None = None
    sliding_pattern: int | None = None


def _gemma_derived(file: GGUFModelFile, dtype: torch.dtype) -> dict[str, Any]:
    """Gemma's embedding scale, sqrt(hidden size) in the model dtype (as transformers
    multiplies), and its softmax scale, which GGUF files do not store: llama.cpp takes
    head_dim ** -0.5, but (hidden size / heads) ** -0.5 for the 27B models (told by their
    layer count), which is query_pre_attn_scalar ** -0.5 in their configs."""
    hidden, heads = file.required("embedding_length"), file.required("attention.head_count")
    largest = {"gemma2": 46, "gemma3": 62}[file.arch] == file.required("block_count")
    scalar = hidden // heads if largest else file.head_dim()
    return {"embedding_multiplier": gemma_embedding_multiplier(hidden, dtype),
            "attention_multiplier": scalar**-0.5}


# Gemma's options as its GGUF files hold them: llama.cpp's converter stores each norm's
# weight plus one, so the norms scale by the stored weight (no offset)
_GEMMA = {"norm_placement": "sandwich", "hidden_act": "gelu_pytorch_tanh", "norm_offset": 0.0}
_GEMMA_NORMS = {"ffn_norm": "pre_feedforward_layernorm"}


# llama.cpp architecture -> how it stores the Hugging Face one
_ARCHITECTURES = {
    "llama": _Family("LlamaForCausalLM", permuted=True),
    "mistral": _Family("MistralForCausalLM"),
    "qwen2": _Family("Qwen2ForCausalLM"),
    "qwen3": _Family("Qwen3ForCausalLM", options={"qk_norm": "head"}),
    "qwen3moe": _Family(
        "Qwen3MoeForCausalLM",
        block_names={"ffn_gate_inp": "mlp.gate",
                     "ffn_gate_exps": "mlp.experts.{expert}.gate_proj",
                     "ffn_down_exps": "mlp.experts.{expert}.down_proj",
                     "ffn_up_exps": "mlp.experts.{expert}.up_proj"},
        options={"qk_norm": "head"},
        # llama.cpp renormalizes Qwen3-MoE's top-k router weights unless told otherwise
        metadata={"expert_feed_forward_length": ("moe_intermediate_size", None),
                  "expert_weights_norm": ("norm_topk_prob", True)}),
    "phi3": _Family("Phi3ForCausalLM", block_names={"ffn_up": "mlp.gate_up_proj"}),
    "olmo2": _Family("Olmo2ForCausalLM", options={"qk_norm": "full", "norm_placement": "post"}),
    "granite": _Family(
        "GraniteForCausalLM", permuted=True,
        metadata={"embedding_scale": ("embedding_multiplier", 1.0),
                  "residual_scale": ("residual_multiplier", 1.0),
                  "attention.scale": ("attention_multiplier", None),
                  "logit_scale": ("logits_scaling", 1.0)}),
    "gemma2": _Family(
        "Gemma2ForCausalLM", block_names=_GEMMA_NORMS, options=_GEMMA, derived=_gemma_derived,
        sliding_pattern=2,
        metadata={"attn_logit_softcapping": ("attn_logit_softcapping", 50.0),
                  "final_logit_softcapping": ("final_logit_softcapping", 30.0)}),
    "gemma3": _Family(
        "Gemma3ForCausalLM", block_names=_GEMMA_NORMS, options={**_GEMMA, "qk_norm": "head"},
        derived=_gemma_derived, sliding_pattern=6,
        metadata={"final_logit_softcapping": ("final_logit_softcapping", None),
                  "rope.freq_base_swa": ("local_rope_theta", 10000.0)}),
}
# llama.cpp per-block tensor name -> Hugging Face name inside model.layers.{i} ("{expert}":
# one tensor per expert, stacked along the GGUF tensor's outermost dimension)
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.{expert}.w1",
    "ffn_down_exps": "block_sparse_moe.experts.{expert}.w2",
    "ffn_up_exps": "block_sparse_moe.experts.{expert}.w3",
}
# fused projections (Phi-3's) -> the projections they stack, cut apart here by their rows
# (``_ROWS``), so that each keeps its low-bit blocks as an unfused one does
_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_ROWS: dict[str, Callable[[ModelConfig], int]] = {
    "q_proj": lambda c: c.q_size,
    "k_proj": lambda c: c.kv_size,
    "v_proj": lambda c: c.kv_size,
    "gate_proj": lambda c: c.intermediate_size,
    "up_proj": lambda c: c.intermediate_size,
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# LongRoPE's factors (Phi-3), which llama.cpp stores as tensors: read into the config
_LONGROPE_FACTORS = {"long_factor": "rope_factors_long.weight",
                     "short_factor": "rope_factors_short.weight"}
# per-frequency divisors, where llama.cpp's converter computes the scaling (Llama 3.1's)
_FREQ_FACTORS = "rope_freqs.weight"
# YaRN metadata -> the key of a Hugging Face rope scaling
_YARN_FIELDS = {"attention_factor": "rope.scaling.yarn_attn_factor",
                "beta_fast": "rope.scaling.yarn_beta_fast",
                "beta_slow": "rope.scaling.yarn_beta_slow"}
# YaRN metadata no Hugging Face config states, with the value that changes nothing
_YARN_UNSUPPORTED = {"rope.scaling.yarn_ext_factor": 1.0, "rope.scaling.yarn_log_multiplier": 0.0}
# tensors llama.cpp stores that are no weights in transformers
_IGNORED = {_FREQ_FACTORS, *_LONGROPE_FACTORS.values()}


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

    def required(self, key: str) -> Any:
        """``{arch}.{key}``, which the file must hold."""
        value = self.arch_field(key)
        if value is None:
            raise ModelLoadError(f"{self.path} lacks the {self.arch}.{key} metadata")
        return value

    @property
    def family(self) -> _Family:
        family = _ARCHITECTURES.get(self.arch)
        if family is None:
            raise UnsupportedModelError(
                f"GGUF architecture {self.arch!r} is not supported; supported: {', '.join(_ARCHITECTURES)}"
            )
        return family

    def model_config(self, dtype: torch.dtype) -> ModelConfig:
        family = self.family
        experts = self.arch_field("expert_count", 0) or 0
        architecture = family.architecture
        if experts and self.arch == "llama":
            architecture = "MixtralForCausalLM"
        num_heads = self.required("attention.head_count")
        head_dim = self.head_dim()
        rotary_dim = self.arch_field("rope.dimension_count", head_dim)
        window, window_layers = self._sliding_window()
        # only some converters write the vocabulary size; the embedding table has it
        vocab = self.arch_field("vocab_size") or int(self.tensor("token_embd.weight").shape[-1])
        return ModelConfig(
            architecture=architecture,
            vocab_size=vocab,
            hidden_size=self.required("embedding_length"),
            num_layers=self.required("block_count"),
            num_heads=num_heads,
            num_kv_heads=self.arch_field("attention.head_count_kv") or num_heads,
            head_dim=head_dim,
            intermediate_size=self.required("feed_forward_length"),
            rms_norm_eps=float(self.arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self.arch_field("rope.freq_base", 10000.0)),
            rope_scaling=self._rope_scaling(),
            rotary_dim=None if rotary_dim == head_dim else rotary_dim,
            max_position_embeddings=self.arch_field("context_length", 2048),
            tie_word_embeddings="output.weight" not in self.tensors,
            sliding_window=window,
            sliding_window_layers=window_layers,
            attention_bias="blk.0.attn_q.bias" in self.tensors,
            num_experts=experts,
            num_experts_per_tok=self.arch_field("expert_used_count", 0) or 0,
            dtype=dtype,
            **family.options,
            **{option: self.arch_field(key, default)
               for key, (option, default) in family.metadata.items()},
            **(family.derived(self, dtype) if family.derived else {}),
        )

    def head_dim(self) -> int:
        return (self.arch_field("attention.key_length")
                or self.required("embedding_length") // self.required("attention.head_count"))

    def _sliding_window(self) -> tuple[int | None, list[int] | None]:
        """(the window, the layers that slide when only some do); llama.cpp writes 0 for no
        window. A pattern of sliding and full layers is read only for the architectures that
        have one; per-layer patterns (lists) are refused."""
        window = self.arch_field("attention.sliding_window") or None
        stated = self.arch_field("attention.sliding_window_pattern")
        pattern = self.family.sliding_pattern
        if stated is not None and (pattern is None or not isinstance(stated, int)):
            raise UnsupportedModelError(
                f"{self.arch}.attention.sliding_window_pattern {stated!r}: this layout of "
                "sliding-window and full-attention layers is not supported from GGUF files")
        pattern = stated or pattern
        if window is None or pattern is None:
            return window, None
        layers = self.required("block_count")
        sliding = [i for i in range(layers) if (i + 1) % pattern != 0]
        return window, None if len(sliding) == layers else sliding

    def _rope_scaling(self) -> dict[str, Any] | None:
        if _LONGROPE_FACTORS["long_factor"] in self.tensors:
            return self._longrope()
        if _FREQ_FACTORS in self.tensors:
            return {"rope_type": "freq_factors", "factors": self._values(_FREQ_FACTORS).tolist()}
        kind = self.arch_field("rope.scaling.type")
        if kind in (None, "none"):
            return None
        if kind == "yarn":
            return self._yarn()
        if kind != "linear":
            raise UnsupportedModelError(f"GGUF rope scaling {kind!r} is not supported")
        return {"rope_type": "linear", "factor": float(self.arch_field("rope.scaling.factor"))}

    def _yarn(self) -> dict[str, Any]:
        """YaRN, spelled as in Hugging Face configs (llama.cpp's converter writes the factor,
        the original context and whichever of the attention factor and betas the config
        states; the others keep transformers' defaults)."""
        scaling = {"rope_type": "yarn", "factor": float(self.required("rope.scaling.factor")),
                   "original_max_position_embeddings":
                       int(self.required("rope.scaling.original_context_length"))}
        for key, name in _YARN_FIELDS.items():
            if (value := self.arch_field(name)) is not None:
                scaling[key] = float(value)
        for name, neutral in _YARN_UNSUPPORTED.items():
            if (value := self.arch_field(name)) not in (None, neutral):
                raise UnsupportedModelError(
                    f"GGUF YaRN with {self.arch}.{name} = {value} is not supported (only "
                    f"{neutral}, which Hugging Face configs cannot state otherwise)")
        return scaling

    def _longrope(self) -> dict[str, Any]:
        """Phi-3's LongRoPE, spelled as in Hugging Face configs: the factors are tensors."""
        scaling = {"rope_type": "longrope",
                   "original_max_position_embeddings":
                       self.required("rope.scaling.original_context_length")}
        for key, name in _LONGROPE_FACTORS.items():
            scaling[key] = self._values(name).tolist()
        if (attention_factor := self.arch_field("rope.scaling.attn_factor")) is not None:
            scaling["attention_factor"] = float(attention_factor)
        return scaling

    def tensor(self, name: str):
        """The descriptor of tensor ``name``, which the file must hold."""
        tensor = self.tensors.get(name)
        if tensor is None:
            raise ModelLoadError(f"{self.path} lacks the {name} tensor")
        return tensor

    def _values(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self.tensor(name)
        return dequantize(tensor.data, tensor.tensor_type).astype(np.float64)

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
        """Every tensor renamed, with llama.cpp's Q/K row permutation undone and stacked experts
        and fused projections cut apart: dequantized to fp32, or for names ``keep_quantized``
        selects, its raw blocks (uint8 [rows, bytes per row]; each row's blocks are its own,
        so the permutation and the cuts move them as they are)."""
        from gguf.quants import dequantize

        permuted = self.family.permuted
        for name, tensor in self.tensors.items():
            if name in _IGNORED:
                continue
            names = self._hf_names(name, _num_experts(tensor))
            raw = all(keep_quantized(hf_name) for hf_name in names)
            array = tensor.data if raw else dequantize(tensor.data, tensor.tensor_type)
            for hf_name, part in zip(names, _parts(array, names, config), strict=True):
                if permuted and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                    heads = config.num_heads if "q_proj" in hf_name else config.num_kv_heads
                    part = unpermute_rotary_rows(part, heads)
                # memory-mapped tensors (unquantized or raw blocks) are read-only: copy those
                yield hf_name, torch.from_numpy(part if part.flags.writeable else part.copy())

    def _hf_names(self, name: str, num_experts: int) -> list[str]:
        """The Hugging Face names of GGUF tensor ``name``: one per expert for stacked experts,
        one per projection for fused ones."""
        stem, _, kind = name.rpartition(".")
        if stem in _GLOBAL_NAMES:
            return [f"{_GLOBAL_NAMES[stem]}.{kind}"]
        match = _BLOCK.match(name)
        hf_part = match and self.family.block_names.get(match[2], _BLOCK_NAMES.get(match[2]))
        if not hf_part:
            raise ModelLoadError(f"GGUF tensor {name!r} is not understood")
        layer, _, kind = match.groups()
        parts = ([hf_part.format(expert=e) for e in range(num_experts)] if "{expert}" in hf_part
                 else _FUSED.get(hf_part, (hf_part,)))
        return [f"model.layers.{layer}.{part}.{kind}" for part in parts]


def _parts(array: np.ndarray, names: list[str], config: ModelConfig) -> list[np.ndarray]:
    """``array`` cut into the tensors ``names``: experts along its outermost axis, fused
    projections by their rows."""
    if len(names) == 1:
        return [array]
    if array.ndim == 3:
        return list(array)
    rows = [_ROWS[name.split(".")[-2]](config) for name in names]
    return np.split(array, np.cumsum(rows)[:-1])


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
