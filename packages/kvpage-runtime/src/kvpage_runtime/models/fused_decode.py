"""Decode steps of a Llama-family model through kvpage_kernels' fused decoder stack.

The stack runs every layer of a decode step in one C call with the kernels the layer modules
call (see ``kvpage_kernels.fused_decoder``): in fp32 with the same GEMM on the same packs as
the modules (kvpage's own GEMM on its panels, or MKL's on its packs where the cpu kernels'
GEMM is not used), so it computes exactly what they compute; in bf16 with MKL's bf16 GEMM on
the plain weights, which agrees with the modules' GEMM to bf16 rounding (only on Intel CPUs:
MKL's bf16 GEMM takes a slow path elsewhere, measured 0.6-0.75x oneDNN's per-layer decode on
an AMD EPYC Zen 4); low-bit (quantized) weights in fp32 with the C function that
``packed_linear`` calls on them, bit-identical too. It is used on the CPU with the ``cpu``
kernel backend, for the layers of every family the models serve, with their options
(q/k norms, norm placements, multipliers, GeGLU, soft-capping, sliding and full layers, a
local RoPE, mixtures of experts (Mixtral, Qwen3-MoE) with their dense router; dense fp32
weights packed, so ``KVPAGE_CPU_WEIGHT_PACKING=0`` keeps fp32 decode steps on the layer
modules); tensor parallelism, fp16, low-bit weights in a bf16 model, layers mixing low-bit and
dense weights, LoRA adapters on a mixture of experts and prefill steps keep the per-layer path (logged
when the stack is built).
``KVPAGE_FUSED_DECODER=0`` turns it off.

It proves itself when it is built (once per KV cache, when the engine allocates it): one
decode step of the loaded model, run through the stack and through the layer modules on the
same inputs (a few sequences over random context in a scratch KV cache of their own, never
the engine's), must agree within the dtype's tolerance. Where it calls MKL (MKL-packed fp32,
bf16) through symbols and packed buffers that belong to torch's build, which no torch release
promises to keep, the torch release must also be one it was tested with (``TESTED_TORCH``).
Otherwise it logs a warning saying why and the modules are used instead.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from kvpage_kernels import (
    KernelBackendUnavailable,
    KernelError,
    KernelInputError,
    PackedWeight,
    QuantizedPanels,
    select_backend,
)
from kvpage_kernels.cpu_isa import cpu_vendor
from kvpage_kernels.fused_decoder import (
    DecoderLayerWeights,
    DecoderShape,
    FusedDecoder,
    LoRAWeights,
)
from torch import nn

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.forward_batch import ForwardBatch
from kvpage_runtime.layers.attention import KVCache
from kvpage_runtime.layers.linear import Linear, UnquantizedLinearMethod
from kvpage_runtime.layers.mlp import GatedMLP
from kvpage_runtime.layers.moe import SparseMoE
from kvpage_runtime.layers.packed_gemm import DTYPE_NAMES, MklPackedLinear, PanelLinear
from kvpage_runtime.layers.quantization.low_bit import LowBitLinearMethod

if TYPE_CHECKING:
    from kvpage_runtime.models.llama import LlamaModel

ENV_VAR = "KVPAGE_FUSED_DECODER"
# The oldest and newest torch minor releases the stack was tested with.
TESTED_TORCH = ((2, 11), (2, 14))
# The relative error the check step allows between the stack's last hidden state and the
# modules': fp32 is meant to be bit-identical; bf16 rounding compounds over the layers (on
# SmolLM2-135M's 30 layers the two differ by about 1e-2; a broken GEMM gives about 1 or NaN).
CHECK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2}
# The check step's sequences: how many tokens of context each has before its new token.
CHECK_CONTEXT_LENS = (1, 2, 3)
logger = logging.getLogger(__name__)
# Hugging Face's hidden_act -> the stack's activation
STACK_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class _Declined(Exception):
    """Why the stack is not used for layers that fit it; ``level``: how loudly to log it."""

    def __init__(self, reason: str, level: int = logging.INFO) -> None:
        super().__init__(reason)
        self.level = level


def build_fused_decoder(model: LlamaModel, kv_caches: list[KVCache]) -> FusedDecoder | None:
    """The fused stack over ``model``'s layers and ``kv_caches``, or None where it does not
    apply or does not prove itself."""
    if model.tp.size > 1:
        logger.info("decode steps run layer by layer: the fused stack has no collectives for "
                    "tensor parallelism")
        return None
    if not _applies(model.config, kv_caches):
        return None
    try:
        weights = [_layer_weights(layer, cache)
                   for layer, cache in zip(model.layers, kv_caches, strict=True)]
        if not isinstance(weights[0].qkv, PackedWeight | QuantizedPanels):  # MKL's, in torch
            _check_torch_release()
        shape = _decoder_shape(model.config)
        _check_against_modules(model, shape, weights)
        return _construct(shape, weights)
    except _Declined as e:
        logger.log(e.level, "decode steps run layer by layer: %s", e)
        return None


def _applies(config: ModelConfig, kv_caches: list[KVCache]) -> bool:
    cache = kv_caches[0][0]
    return (os.environ.get(ENV_VAR) != "0" and config.dtype in CHECK_TOLERANCE  # fp32, bf16
            and cache.dtype == config.dtype and select_backend(cache.device) == "cpu")


def _weight(linear: Linear) -> torch.Tensor | PackedWeight | QuantizedPanels:
    """The weight as the fused stack multiplies by it (in fp32 the layer's pack: panels for
    kvpage's GEMM, or MKL's, or low-bit panels; plain in bf16)."""
    if isinstance(linear.method, LowBitLinearMethod):
        if linear.dtype != torch.float32:
            raise _Declined("the stack multiplies low-bit weights in fp32 only, and this model "
                            f"runs in {DTYPE_NAMES.get(linear.dtype, linear.dtype)}")
        return linear.packed
    if not isinstance(linear.method, UnquantizedLinearMethod):
        raise _Declined(f"the fused stack does not take {type(linear.method).__name__} weights")
    if linear.weight.dtype == torch.bfloat16:
        if cpu_vendor() != "GenuineIntel":
            raise _Declined("the stack's bf16 GEMM is MKL's, whose fast path needs an Intel CPU "
                            f"(this one: {cpu_vendor() or 'unknown'}): oneDNN's per layer is "
                            "faster here")
        return linear.weight.data
    if isinstance(linear.packed, PanelLinear):
        return linear.packed.packed
    if isinstance(linear.packed, MklPackedLinear):
        return linear.packed.mkl_weight
    raise _Declined("the fp32 stack multiplies by packed weights and these are not packed "
                    "(KVPAGE_CPU_WEIGHT_PACKING=0, or neither the cpu kernels nor MKL)")


def _mlp_weights(mlp: nn.Module) -> dict:
    """The MLP's weights as DecoderLayerWeights takes them: gate_up and down, or a mixture of
    experts' router and experts (which carry no LoRA adapters in the stack)."""
    if type(mlp) is GatedMLP:
        return {"gate_up": _weight(mlp.gate_up_proj), "down": _weight(mlp.down_proj)}
    if type(mlp) is not SparseMoE:
        raise _Declined(f"the fused stack has no {type(mlp).__name__}")
    linears = [mlp.gate, *(p for e in mlp.experts for p in (e.gate_up_proj, e.down_proj))]
    if any(linear.lora is not None for linear in linears):
        raise _Declined("the fused stack serves no LoRA adapters on a mixture of experts")
    return {"gate_up": None, "down": None, "router": _weight(mlp.gate),
            "experts": [(_weight(e.gate_up_proj), _weight(e.down_proj)) for e in mlp.experts]}


def _layer_weights(layer: nn.Module, kv_cache: KVCache) -> DecoderLayerWeights:
    """The layer's tensors for the fused stack."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o = _weight(attn.qkv_proj), _weight(attn.o_proj)
    dense_mlp = type(mlp) is GatedMLP
    attn_norms = {} if attn.q_norm is None else {"q_norm": attn.q_norm.weight.data,
                                                  "k_norm": attn.k_norm.weight.data}
    norms = layer.norm_weights()
    return DecoderLayerWeights(
        input_norm=norms.get("input_layernorm"),
        qkv=qkv,
        qkv_bias=None if attn.qkv_proj.bias is None else attn.qkv_proj.bias.data,
        o=o,
        post_attention_norm=norms["post_attention_layernorm"],
        k_cache=kv_cache[0],
        v_cache=kv_cache[1],
        lora=_lora_weights(attn.qkv_proj, attn.o_proj, *((mlp.gate_up_proj, mlp.down_proj)
                                                          if dense_mlp else ())),
        pre_feedforward_norm=norms.get("pre_feedforward_layernorm"),
        post_feedforward_norm=norms.get("post_feedforward_layernorm"),
        sliding=attn.attn.sliding_window is not None,
        local_rope=layer.local_rope,
        **attn_norms,
        **_mlp_weights(mlp),
    )


def _lora_weights(*linears: Linear) -> tuple[LoRAWeights | None, ...] | None:
    """The adapter slots of the projections (``Linear.lora``, set where the engine serves
    LoRA adapters; qkv, o, then gate_up and down where given), or None where none has any."""
    if all(linear.lora is None for linear in linears):
        return None
    return tuple(None if linear.lora is None else LoRAWeights(linear.lora.a, linear.lora.b)
                 for linear in linears) + (None,) * (4 - len(linears))


def _check_torch_release() -> None:
    release = tuple(int(n) for n in re.findall(r"\d+", torch.__version__)[:2])
    oldest, newest = TESTED_TORCH
    if not oldest <= release <= newest:
        raise _Declined(
            f"torch {torch.__version__} is outside the releases the fused stack was tested "
            f"with ({'.'.join(map(str, oldest))} to {'.'.join(map(str, newest))})",
            logging.WARNING)


def _decoder_shape(config: ModelConfig) -> DecoderShape:
    return DecoderShape(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        sliding_window=config.sliding_window,
        scale=config.attention_multiplier,
        residual_multiplier=config.residual_multiplier,
        qk_norm=config.qk_norm,
        norm_placement=config.norm_placement,
        activation=STACK_ACTIVATIONS[config.hidden_act],
        softcap=config.attn_logit_softcapping,
        rotary_dim=config.rotary_dim,
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        normalize_top_k=config.norm_topk_prob,
        expert_intermediate_size=config.moe_intermediate_size or config.intermediate_size,
    )


def _construct(shape: DecoderShape, weights: list[DecoderLayerWeights]) -> FusedDecoder:
    try:
        return FusedDecoder(shape, weights)
    except (KernelBackendUnavailable, KernelInputError) as e:  # no compiler or MKL, or a
        raise _Declined(str(e)) from e                          # layout it does not take


@dataclass
class _CheckStep:
    """One decode step of a few sequences over a scratch KV cache holding random context."""

    batch: ForwardBatch
    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    local: tuple[torch.Tensor, torch.Tensor] | None  # the sliding layers' own cos and sin
    kv_caches: list[KVCache]


@torch.inference_mode()
def _check_against_modules(model: LlamaModel, shape: DecoderShape,
                           weights: list[DecoderLayerWeights]) -> None:
    """Run a check step through the stack and through the layer modules, each on its own copy
    of the scratch cache; raise if their outputs differ beyond the dtype's tolerance."""
    step = _check_step(model, block_size=weights[0].k_cache.shape[1])
    stack = _construct(shape, [replace(w, k_cache=k.clone(), v_cache=v.clone())
                               for w, (k, v) in zip(weights, step.kv_caches, strict=True)])
    batch = step.batch
    try:
        fused = stack(step.hidden, step.cos, step.sin, batch.slot_mapping, batch.block_tables,
                      batch.seq_lens, batch.query_start_loc, None, step.local)
    except KernelError as e:
        raise _Declined(f"the fused stack failed its check step: {e}", logging.WARNING) from e
    modules = model.run_layers(step.hidden.clone(), step.cos, step.sin, batch, step.kv_caches,
                               step.local)
    # compared: the sum of MLP output and residual, the model's final norm's input
    error = _relative_error(fused[0] + fused[1], modules[0] + modules[1])
    tolerance = CHECK_TOLERANCE[model.config.dtype]
    if not error <= tolerance:  # NaN fails too
        raise _Declined(
            f"on a check step the fused stack's output differs from the layer modules' by "
            f"{error:.1e} (relative; {DTYPE_NAMES[model.config.dtype]} allows {tolerance:.0e})",
            logging.WARNING)


def _check_step(model: LlamaModel, block_size: int) -> _CheckStep:
    config, n = model.config, len(CHECK_CONTEXT_LENS)
    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor(CHECK_CONTEXT_LENS)  # each new token follows its context
    blocks_per_seq = max(CHECK_CONTEXT_LENS) // block_size + 1
    tables = torch.arange(n * blocks_per_seq, dtype=torch.int32).view(n, blocks_per_seq)
    slots = tables[torch.arange(n), positions // block_size] * block_size + positions % block_size
    cache_shape = (tables.numel(), block_size, config.num_kv_heads, config.head_dim)
    kv_caches = [(_random(cache_shape, config.dtype, gen), _random(cache_shape, config.dtype, gen))
                 for _ in range(config.num_layers)]
    input_ids = torch.randint(config.vocab_size, (n,), generator=gen)
    cos, sin = model.rotary.lookup(positions)
    batch = ForwardBatch(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slots.long(),
        block_tables=tables,
        seq_lens=(positions + 1).int(),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        max_seq_len=max(CHECK_CONTEXT_LENS) + 1,
        max_query_len=1,
    )
    local = None if model.local_rotary is None else model.local_rotary.lookup(positions)
    return _CheckStep(batch, model.embed_tokens(input_ids), cos, sin, local, kv_caches)


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())
