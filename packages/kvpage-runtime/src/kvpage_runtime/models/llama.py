"""The Llama family: Llama 2/3, SmolLM2, Mistral (GQA, sliding window), Qwen2 (QKV bias),
Qwen3 (per-head q/k norms), OLMo 2 (norms after the blocks, q/k norms over the projections),
Granite (multipliers) and Gemma 2/3 (norms around the blocks, GeGLU, soft-capping, sliding
and full layers alternating, a RoPE of their own for the sliding layers).

They differ only in configuration (``ModelConfig``'s family options), so one implementation
serves all of them. Module names
follow the Hugging Face checkpoints, except that q/k/v and gate/up are fused at load time.
Each module is built with its name in the model (``prefix``), by which ``LinearMethods``
gives each linear layer the method the checkpoint stores it in (dense, or low-bit), and with
its tensor-parallel group (``tp``), by which a rank builds its slice of each layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from kvpage_kernels import rotary_embedding
from torch import nn

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.errors import ModelLoadError
from kvpage_runtime.forward_batch import ForwardBatch
from kvpage_runtime.layers.attention import KVCache, PagedAttention
from kvpage_runtime.layers.embedding import TiedLMHead, VocabEmbedding
from kvpage_runtime.layers.linear import Linear, Parallel
from kvpage_runtime.layers.mlp import GatedMLP
from kvpage_runtime.layers.moe import SparseMoE
from kvpage_runtime.layers.norm import ProjectionRMSNorm, RMSNorm
from kvpage_runtime.layers.quantization import LinearMethods, QuantizationConfig
from kvpage_runtime.layers.rotary import RotaryEmbedding
from kvpage_runtime.models.fused_decode import build_fused_decoder
from kvpage_runtime.models.weights import WeightLoader

# Steps whose sequences each bring at most this many tokens after some context (decode steps,
# speculative decoding's verification, short prefill chunks that follow others) run through
# the fused decoder stack, one row per token; prompts start on the layer modules, whose
# prefill attention also serves long queries better.
FUSED_MAX_QUERY_LEN = 16
PACKED = "packed"  # the name part of packed tensors in ``export_state``


class LlamaAttention(nn.Module):
    """Tensor parallel: each rank computes its query heads and their KV heads (QKV column
    parallel), and o_proj (row parallel) sums the ranks' heads. ``config.qk_norm``: the
    queries and keys are normalized before RoPE, per head or over the whole projection.
    ``index``: the layer's, which says whether it slides (``config.layer_sliding_window``)."""

    def __init__(self, config: ModelConfig, device, methods: LinearMethods, prefix: str,
                 tp: TensorParallel, index: int) -> None:
        super().__init__()
        heads = tp.heads(config.num_heads, config.num_kv_heads)
        self.num_heads = heads.num_heads
        self.num_kv_heads = heads.num_kv_heads
        self.head_dim = d = config.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        self.qk_size = q_size + kv_size
        kv_part = (heads.kv_start * d, config.kv_size)
        self.qkv_proj = Linear(
            config.hidden_size,
            [q_size, kv_size, kv_size],
            bias=config.attention_bias,
            dtype=config.dtype,
            device=device,
            method=methods.linear(f"{prefix}.qkv_proj"),
            parallel=Parallel.column(tp, [(heads.q_start * d, config.q_size), kv_part, kv_part]),
        )
        self.o_proj = Linear(
            q_size, [config.hidden_size], dtype=config.dtype, device=device,
            method=methods.linear(f"{prefix}.o_proj"),
            parallel=Parallel.row(tp, heads.q_start * d, config.q_size),
        )
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d,
                                   config.layer_sliding_window(index),
                                   config.attention_multiplier, config.attn_logit_softcapping)
        self.qk_norm = config.qk_norm
        self.q_norm = self.k_norm = None
        eps, dtype = config.rms_norm_eps, config.dtype
        if config.qk_norm == "head":
            self.q_norm = RMSNorm(d, eps, dtype, device, config.norm_offset)
            self.k_norm = RMSNorm(d, eps, dtype, device, config.norm_offset)
        elif config.qk_norm == "full":
            self.q_norm = ProjectionRMSNorm(config.q_size, heads.q_start * d, q_size, eps,
                                            dtype, device, tp)
            self.k_norm = ProjectionRMSNorm(config.kv_size, heads.kv_start * d, kv_size, eps,
                                            dtype, device, tp)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.qk_size]
        if self.qk_norm is not None:
            qk = self.normalize_qk(qk)
        # q and k heads are rotated together in one pass.
        qk = rotary_embedding(qk.view(n, -1, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.qk_size :].view(n, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, batch, kv_cache))

    def normalize_qk(self, qk: torch.Tensor) -> torch.Tensor:
        """Queries and keys [n, q_size + kv_size] through their norms."""
        q, k = qk.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim],
                        dim=-1)
        if self.qk_norm == "head":
            d = self.head_dim
            q = self.q_norm(q.reshape(-1, d)).view(q.shape)
            k = self.k_norm(k.reshape(-1, d)).view(k.shape)
        else:
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        return torch.cat([q, k], dim=-1)


# ``config.norm_placement`` -> the norms of a decoder layer, by their checkpoint names.
LAYER_NORMS = {
    "pre": ("input_layernorm", "post_attention_layernorm"),
    "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
}


class LlamaDecoderLayer(nn.Module):
    """Norms (``config.norm_placement``) before attention and the MLP (``input_layernorm``,
    ``post_attention_layernorm``), after them (OLMo 2: ``post_attention_layernorm``,
    ``post_feedforward_layernorm``) or both (Gemma: all four). The MLP of layer ``index`` is a
    mixture of experts where the config says so (``is_moe_layer``); a sliding layer of a model
    with a RoPE of its own for those (``config.local_rope_theta``) rotates by that one."""

    def __init__(self, config: ModelConfig, device, methods: LinearMethods, prefix: str,
                 tp: TensorParallel, index: int) -> None:
        super().__init__()
        self.norm_placement = config.norm_placement
        for name in LAYER_NORMS[config.norm_placement]:
            setattr(self, name, RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype,
                                        device, config.norm_offset))
        self.residual_multiplier = config.residual_multiplier
        self.local_rope = (config.local_rope_theta is not None
                           and config.layer_sliding_window(index) is not None)
        self.self_attn = LlamaAttention(config, device, methods, f"{prefix}.self_attn", tp, index)
        prefix = f"{prefix}.mlp"
        if config.is_moe_layer(index):
            self.mlp = SparseMoE(
                config.hidden_size, config.moe_intermediate_size or config.intermediate_size,
                config.num_experts, config.num_experts_per_tok, config.dtype, device, methods,
                prefix, tp, config.norm_topk_prob)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.dtype,
                                device, methods, prefix, tp, activation=config.hidden_act)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, residual stream before it); the next norm adds them."""
        if self.norm_placement == "post":
            return self.forward_post_norm(hidden, residual, cos, sin, batch, kv_cache)
        if self.norm_placement == "sandwich":
            return self.forward_sandwich_norm(hidden, residual, cos, sin, batch, kv_cache)
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.scaled(self.self_attn(hidden, cos, sin, batch, kv_cache))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.scaled(self.mlp(hidden)), residual

    def forward_post_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                          cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                          kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """OLMo 2: x + norm(attention(x)), then the MLP's normalized output beside it."""
        x = hidden if residual is None else hidden + residual
        attention = self.scaled(self.self_attn(x, cos, sin, batch, kv_cache))
        x = x + self.post_attention_layernorm(attention)
        return self.post_feedforward_layernorm(self.scaled(self.mlp(x))), x

    def forward_sandwich_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                              cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                              kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Gemma: x + norm(attention(norm(x))), then norm(MLP(norm(.))) beside it."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        attention = self.scaled(self.self_attn(hidden, cos, sin, batch, kv_cache))
        hidden, residual = self.pre_feedforward_layernorm(
            self.post_attention_layernorm(attention), residual)
        return self.post_feedforward_layernorm(self.scaled(self.mlp(hidden))), residual

    def norm_weights(self) -> dict[str, torch.Tensor]:
        """This layer's norms' weights, by their checkpoint names."""
        return {name: getattr(self, name).weight.data
                for name in LAYER_NORMS[self.norm_placement]}

    def scaled(self, block_output: torch.Tensor) -> torch.Tensor:
        """A block's output times the residual multiplier (Granite's; 1 in the others)."""
        m = self.residual_multiplier
        return block_output if m == 1.0 else block_output * m


class LlamaModel(nn.Module):
    def __init__(
        self, config: ModelConfig, device, methods: LinearMethods, prefix: str = "model",
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = tp or TensorParallel()
        self.embed_tokens = VocabEmbedding(
            config.vocab_size, config.hidden_size, config.dtype, device,
            methods.table(f"{prefix}.embed_tokens"), self.tp,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, device, methods, f"{prefix}.layers.{i}", self.tp, i)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype, device,
                            config.norm_offset)
        self.rotary = RotaryEmbedding(
            config.rotary_dim or config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            config.dtype,
            device,
        )
        self.local_rotary = None  # the sliding layers' own RoPE (Gemma 3)
        if config.local_rope_theta is not None:
            self.local_rotary = RotaryEmbedding(
                config.rotary_dim or config.head_dim, config.max_position_embeddings,
                config.local_rope_theta, config.local_rope_scaling, config.dtype, device)
        self._fused = (None, None)  # (KV cache it was built for, fused decoder or None)

    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> torch.Tensor:
        hidden = self.embed_tokens(batch.input_ids)
        if self.config.embedding_multiplier != 1.0:
            hidden = hidden * self.config.embedding_multiplier
        cos, sin = self.rotary.lookup(batch.positions)
        local = None if self.local_rotary is None else self.local_rotary.lookup(batch.positions)
        one_token_each = batch.max_query_len == 1
        short_after_context = batch.max_query_len <= FUSED_MAX_QUERY_LEN and batch.min_context_len
        if ((one_token_each or short_after_context)
                and (fused := self.fused_decoder(kv_caches)) is not None
                and (batch.lora_slots is None or fused.has_lora)):
            rows = batch.one_row_per_token() if batch.max_query_len > 1 else batch
            hidden, residual = fused(hidden, cos, sin, rows.slot_mapping, rows.block_tables,
                                     rows.seq_lens, rows.query_start_loc, rows.lora_slots,
                                     local=local)
        else:
            hidden, residual = self.run_layers(hidden, cos, sin, batch, kv_caches, local)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def run_layers(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   batch: ForwardBatch, kv_caches: list[KVCache],
                   local: tuple[torch.Tensor, torch.Tensor] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer modules one after another over the embeddings ``hidden``; returns the last
        layer's (MLP output, residual stream before it). ``local``: the sliding layers' own
        cos and sin, if they have their own RoPE."""
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            rotation = local if layer.local_rope else (cos, sin)
            hidden, residual = layer(hidden, residual, *rotation, batch, kv_cache)
        return hidden, residual

    def fused_decoder(self, kv_caches: list[KVCache]):
        """The whole-stack decode path for these KV caches, or None (see ``fused_decode``)."""
        built_for, fused = self._fused
        if built_for is not kv_caches[0][0]:
            fused = build_fused_decoder(self, kv_caches)
            self._fused = (kv_caches[0][0], fused)
        return fused


class LlamaForCausalLM(nn.Module):
    """``model(batch, kv_caches)`` -> final hidden states; ``compute_logits(hidden)`` -> logits
    (model dtype). ``quantization`` (None: dense) says which layers the checkpoint stores in
    low-bit form; ``tp`` (None: one rank) which slice of each layer this model holds."""

    # checkpoint projection name -> (fused module name, shard index)
    stacked_params = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self, config: ModelConfig, device=None, quantization: QuantizationConfig | None = None,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = tp or TensorParallel()
        methods = LinearMethods(quantization, self.stacked_params)
        self.model = LlamaModel(config, device, methods, tp=self.tp)
        if config.tie_word_embeddings:
            self.lm_head = TiedLMHead(self.model.embed_tokens)
        else:
            self.lm_head = VocabEmbedding(config.vocab_size, config.hidden_size, config.dtype,
                                          device, methods.table("lm_head"), self.tp,
                                          serves_lm_head=True)

    def bind_kv_caches(self, kv_caches: list[KVCache]) -> None:
        """Called once the engine allocated its KV caches: builds (and checks) the fused
        decode path for them now, at start, rather than at the first decode step."""
        self.model.fused_decoder(kv_caches)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> torch.Tensor:
        return self.model(batch, kv_caches)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of ``hidden``'s rows; None on the ranks other than the driver."""
        logits = self.lm_head.logits(hidden)
        if logits is None:
            return None
        if (scaling := self.config.logits_scaling) != 1.0:
            logits = logits / scaling
        if (cap := self.config.final_logit_softcapping) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named checkpoint tensors into this model; raises if any is missing."""
        loader = WeightLoader(self, self.stacked_params)
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            loader.load(self.model_name(name), tensor)
        loader.check_complete()

    @classmethod
    def model_name(cls, checkpoint_name: str) -> str:
        """The name this model gives checkpoint tensor ``checkpoint_name`` (before fusing)."""
        return checkpoint_name

    def export_state(self) -> dict[str, torch.Tensor]:
        """The weights in this model's own (fused, packed) layout, each stored once: the
        parameters, and the packed tensors of layers whose method keeps more than those."""
        state = dict(self.state_dict())
        for path, linear in self._linears():
            for name, tensor in linear.method.packed_state(linear).items():
                state[f"{path}.{PACKED}.{name}"] = tensor
        return {name: t.contiguous() for name, t in state.items()}

    def adopt_state(self, state: dict[str, torch.Tensor]) -> None:
        """Use the tensors of ``state`` (from ``export_state``, on this model's device) as the
        weights: parameters cast to the model dtype (not copied when they are in it), packed
        tensors as they are."""
        params, packed = _split_packed(state)
        params = {name: t.to(self.config.dtype) for name, t in params.items()}
        missing, unexpected = self.load_state_dict(params, strict=False, assign=True)
        for path, linear in self._linears():
            if path in packed:
                linear.method.adopt_packed_state(linear, packed.pop(path))
        if missing or unexpected or packed:
            raise ModelLoadError(
                f"cached weights do not fit the model: missing {missing}, unexpected "
                f"{unexpected + sorted(packed)}")

    def _linears(self) -> Iterator[tuple[str, Linear]]:
        return ((path, m) for path, m in self.named_modules() if isinstance(m, Linear))


def _split_packed(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``export_state``'s tensors as (parameters, {layer: its packed tensors by field})."""
    params: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        path, _, field = name.rpartition(".")
        layer, _, kind = path.rpartition(".")
        if kind == PACKED:
            packed.setdefault(layer, {})[field] = tensor
        else:
            params[name] = tensor
    return params, packed
