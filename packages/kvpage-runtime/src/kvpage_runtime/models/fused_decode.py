"""Decode steps of a Llama-family model through kvpage_kernels' fused decoder stack.

The stack runs every layer of a decode step in one C call with the kernels the layer modules
call (see ``kvpage_kernels.fused_decoder``): in fp32 with the same MKL GEMM on the same packs,
so it computes exactly what they compute; in bf16 with MKL's bf16 GEMM on the plain weights,
which agrees with the modules' oneDNN GEMM to bf16 rounding. It is used on the CPU with the
``cpu`` kernel backend, for dense layers with the SiLU-gated MLP (fp32 ones MKL-packed);
Mixtral's experts, quantized linear methods, fp16 and prefill steps keep the per-layer path.
``KVPAGE_FUSED_DECODER=0`` turns it off.
"""

from __future__ import annotations

import logging
import os

import torch
from kvpage_kernels import KernelBackendUnavailable, KernelInputError, select_backend
from kvpage_kernels.fused_decoder import DecoderLayerWeights, DecoderShape, FusedDecoder
from torch import nn

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.layers.linear import Linear, UnquantizedLinearMethod
from kvpage_runtime.layers.mlp import GatedMLP
from kvpage_runtime.layers.packed_gemm import MklPackedLinear

ENV_VAR = "KVPAGE_FUSED_DECODER"
logger = logging.getLogger(__name__)


def _weight(linear: Linear) -> torch.Tensor | None:
    """The weight as the fused stack multiplies by it: MKL's pack in fp32, plain in bf16."""
    if not isinstance(linear.method, UnquantizedLinearMethod):
        return None
    if linear.weight.dtype == torch.bfloat16:
        return linear.weight.data
    if isinstance(linear.packed, MklPackedLinear):
        return linear.packed.mkl_weight
    return None


def _layer_weights(layer: nn.Module, kv_cache: tuple[torch.Tensor, torch.Tensor]):
    """The layer's tensors for the fused stack, or None if it is not a dense Llama layer."""
    attn, mlp = layer.self_attn, layer.mlp
    if type(mlp) is not GatedMLP:
        return None
    weights = [_weight(p) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(w is None for w in weights):
        return None
    qkv, o, gate_up, down = weights
    return DecoderLayerWeights(
        input_norm=layer.input_layernorm.weight.data,
        qkv=qkv,
        qkv_bias=None if attn.qkv_proj.bias is None else attn.qkv_proj.bias.data,
        o=o,
        post_attention_norm=layer.post_attention_layernorm.weight.data,
        gate_up=gate_up,
        down=down,
        k_cache=kv_cache[0],
        v_cache=kv_cache[1],
    )


def build_fused_decoder(
    config: ModelConfig, layers: nn.ModuleList, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
) -> FusedDecoder | None:
    """The fused stack over ``layers`` and ``kv_caches``, or None where it does not apply."""
    cache = kv_caches[0][0]
    if os.environ.get(ENV_VAR) == "0" or config.dtype not in (torch.float32, torch.bfloat16):
        return None
    if cache.dtype != config.dtype or select_backend(cache.device) != "cpu":
        return None
    weights = [_layer_weights(layer, cache) for layer, cache in zip(layers, kv_caches, strict=True)]
    if any(w is None for w in weights):
        return None
    shape = DecoderShape(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        sliding_window=config.sliding_window,
    )
    try:
        return FusedDecoder(shape, weights)
    except (KernelBackendUnavailable, KernelInputError) as e:  # no compiler or MKL, or a
        logger.info("decode steps run layer by layer: %s", e)  # layout it does not take
        return None
