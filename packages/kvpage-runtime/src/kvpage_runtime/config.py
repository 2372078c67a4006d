"""Model configuration: the architecture facts the runtime needs, independent of file format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer, as read from config.json or GGUF metadata.

    ``rope_scaling`` is None for plain RoPE, else a dict with a ``rope_type`` key ("linear",
    "llama3", "yarn", "longrope", "dynamic") and that type's parameters, spelled as in Hugging
    Face configs, or "freq_factors" with ``factors`` dividing each frequency (GGUF files
    store Llama 3.1's scaling so); LongRoPE's factors and dynamic NTK's base are chosen once
    for the whole ``max_position_embeddings`` (the context served), see ``layers.rotary``.
    ``rotary_dim`` is the number of values of each head RoPE rotates (None: all of head_dim;
    fewer with partial rotary, Phi-4-mini), in the half-rotation layout within them.
    ``sliding_window`` is the number of most recent tokens (including the current one) a
    token attends to, or None for full attention; ``sliding_window_layers`` lists the layers
    that slide when only some do (None: all of them).

    Family options (defaults: Llama's): ``qk_norm`` "head" normalizes each query and key head
    (RMSNorm over the head dimension, Qwen3), "full" the whole query and key projections
    (OLMo 2), both before RoPE; ``norm_placement`` "post" places the norms after attention
    and after the MLP instead of before them (OLMo 2); Granite's ``embedding_multiplier``
    scales the embeddings, ``residual_multiplier`` each block's output before the residual add,
    ``attention_multiplier`` is the softmax scale (None: head_dim ** -0.5) and the logits are
    divided by ``logits_scaling``. Mixtures of experts (``num_experts`` > 0): the layers listed
    in ``moe_layers`` (None: all) have ``num_experts`` experts of ``moe_intermediate_size``
    (None: ``intermediate_size``), of which each token takes ``num_experts_per_tok``, their
    router probabilities renormalized when ``norm_topk_prob``; the other layers a dense MLP.

    Gemma 2/3: ``norm_placement`` "sandwich" normalizes each block's input and its output
    (four norms a layer); every RMSNorm scales by ``norm_offset`` + weight (1 in Gemma);
    ``hidden_act`` "gelu_pytorch_tanh" gates the MLP with tanh-approximate GELU;
    ``embedding_multiplier`` is sqrt(hidden_size) in the model dtype;
    ``attn_logit_softcapping`` and ``final_logit_softcapping`` cap the attention scores and the
    logits (cap * tanh(x / cap)); ``local_rope_theta`` (and ``local_rope_scaling``) is the
    RoPE of the sliding layers when it differs from the full layers' (Gemma 3).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rotary_dim: int | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_bias: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    moe_layers: list[int] | None = None
    sliding_window_layers: list[int] | None = None
    qk_norm: str | None = None
    norm_placement: str = "pre"
    norm_offset: float = 0.0
    hidden_act: str = "silu"
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    local_rope_theta: float | None = None
    local_rope_scaling: dict[str, Any] | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    dtype: torch.dtype = torch.float32

    def layer_sliding_window(self, index: int) -> int | None:
        """The window layer ``index`` attends over, or None for full attention."""
        if self.sliding_window_layers is None or index in self.sliding_window_layers:
            return self.sliding_window
        return None

    @property
    def cache_sliding_window(self) -> int | None:
        """The window the KV cache may free blocks outside of: the window when every layer
        slides, else None (a full-attention layer still reads every block)."""
        return self.sliding_window if self.sliding_window_layers is None else None

    def is_moe_layer(self, index: int) -> bool:
        return self.num_experts > 0 and (self.moe_layers is None or index in self.moe_layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_heads_per_rank(self, tensor_parallel_size: int = 1) -> int:
        """KV heads each rank holds: an equal part, or one (replicated) when there are fewer
        KV heads than ranks."""
        return max(1, self.num_kv_heads // tensor_parallel_size)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype | None = None,
                                 tensor_parallel_size: int = 1) -> int:
        """Bytes of K and V cache one token takes across all layers on one rank (in ``dtype``,
        default the model's)."""
        itemsize = torch.empty((), dtype=dtype or self.dtype).element_size()
        heads = self.kv_heads_per_rank(tensor_parallel_size)
        return 2 * self.num_layers * heads * self.head_dim * itemsize
