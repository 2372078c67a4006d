"""Public ops and the one dispatch to a backend.

Every op checks its arguments here, picks a backend with `select_backend` (argument, then
the KVPAGE_KERNEL_BACKEND environment variable, then the device), and calls that backend's
function of the same name.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable
from types import ModuleType

import torch

from . import layer_ops, packed_weight, quantized
from ._common import Pairs
from .errors import KernelBackendUnavailable, KernelInputError
from .packed_weight import PackedWeight, QuantizedPanels
from .quantized import QuantizedWeight, check_quantized

BACKENDS = ("reference", "torch", "cpu", "triton", "cupy")
HALF_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # of low-bit packed_linear
ENV_VAR = "KVPAGE_KERNEL_BACKEND"
_MODULES = {"reference": "reference", "torch": "torch_backend", "cpu": "cpu_backend",
            "triton": "triton_backend", "cupy": "cupy_backend"}
logger = logging.getLogger(__name__)


def _triton_missing(device: torch.device, interpret: bool) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the 'triton' package is not installed (pip install 'kvpage-kernels[triton]')"
    if device.type == "cuda" or interpret:
        return None
    return f"triton needs a CUDA device (got {device}) or TRITON_INTERPRET=1 set before import"


def _cupy_missing(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the cupy backend needs a CUDA device (got {device})"
    try:
        import cupy
    except ImportError:
        return "the 'cupy' package is not installed (pip install 'kvpage-kernels[cupy]')"
    if not cupy.cuda.is_available():
        return "cupy is installed but finds no usable CUDA device or driver"
    return None


def _cpu_missing(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend runs on the CPU (got {device})"
    from .cpu_backend import unavailable_reason  # builds the kernel library on first use

    return unavailable_reason()


def _missing(name: str, device: torch.device, interpret: bool) -> str | None:
    """Why backend `name` cannot run on `device`, or None when it can."""
    if name == "cpu":
        return _cpu_missing(device)
    if name == "triton":
        return _triton_missing(device, interpret)
    if name == "cupy":
        return _cupy_missing(device)
    return None


@functools.lru_cache(maxsize=64)
def _select(device_type: str, device_index: int | None, forced: str | None,
            interpret: bool) -> str:
    device = torch.device(device_type, device_index)
    if forced is not None:
        if forced not in BACKENDS:
            raise KernelInputError(f"unknown kernel backend {forced!r}; choose one of {BACKENDS}")
        reason = _missing(forced, device, interpret)
        if reason is not None:
            raise KernelBackendUnavailable(f"kernel backend {forced!r} is unavailable: {reason}")
        return forced
    if device.type == "cuda":
        for name in ("triton", "cupy"):
            if _missing(name, device, interpret) is None:
                return name
    if device.type == "cpu":
        reason = _cpu_missing(device)
        if reason is None:
            return "cpu"
        logger.warning("using the torch kernel backend on the CPU: %s", reason)
    return "torch"


def select_backend(device: torch.device | str, prefer: str | None = None) -> str:
    """Name of the backend to use on `device`: `prefer` if given, else the environment
    variable KVPAGE_KERNEL_BACKEND if set, else triton, cupy, torch on CUDA, cpu (compiled
    at first use), torch on the CPU, and torch elsewhere.
    A forced backend that cannot run raises KernelBackendUnavailable naming what is missing."""
    device = torch.device(device)
    forced = prefer or os.environ.get(ENV_VAR) or None
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return _select(device.type, device.index, forced, interpret)


@functools.cache
def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{_MODULES[name]}")


def _backend(device: torch.device, prefer: str | None) -> ModuleType:
    return _module(select_backend(device, prefer))


def _layer_op(device: torch.device, prefer: str | None, name: str) -> Callable:
    """Layer op `name` of the selected backend, or the plain torch one of ``layer_ops`` when
    the backend has none of its own."""
    return getattr(_backend(device, prefer), name, None) or getattr(layer_ops, name)


def _check(condition: bool, message: Callable[[], str]) -> None:
    """Raises KernelInputError(message()) unless condition; the message is only formatted
    on failure (these checks run on every call of every layer)."""
    if not condition:
        raise KernelInputError(message())


def _check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _check(k_cache.dim() == 4, lambda: f"k_cache must be [num_blocks, block_size, num_kv_heads, "
           f"head_dim], got shape {tuple(k_cache.shape)}")
    _check(v_cache.shape == k_cache.shape, lambda: f"v_cache shape {tuple(v_cache.shape)} differs "
           f"from k_cache shape {tuple(k_cache.shape)}")
    _check(v_cache.dtype == k_cache.dtype, lambda: f"v_cache dtype {v_cache.dtype} differs from "
           f"k_cache dtype {k_cache.dtype}")
    _check(k_cache.is_contiguous() and v_cache.is_contiguous(),
           lambda: "k_cache and v_cache must be contiguous")


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, backend: str | None = None) -> None:
    """Scatters new tokens' keys and values into the paged cache.

    k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: int64 [num_tokens], entry
    block_id * block_size + offset, or -1 to skip the token (padding)."""
    _check_cache_pair(k_cache, v_cache)
    expected = (slot_mapping.shape[0], *k_cache.shape[2:])
    _check(k.shape == expected and v.shape == expected, lambda: f"k and v must be [num_tokens, "
           f"num_kv_heads, head_dim] = {expected}, got {tuple(k.shape)} and {tuple(v.shape)}")
    _check(k.dtype == k_cache.dtype and v.dtype == k_cache.dtype,
           lambda: f"k/v dtype {k.dtype}/{v.dtype} differs from the cache dtype {k_cache.dtype}")
    _check(slot_mapping.dtype == torch.int64,
           lambda: f"slot_mapping must be int64, got {slot_mapping.dtype}")
    _backend(k.device, backend).write_kv(k, v, k_cache, v_cache, slot_mapping)


def _check_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out) -> None:
    _check_cache_pair(k_cache, v_cache)
    _check(q.dim() == 3,
           lambda: f"q must be [num_tokens, num_q_heads, head_dim], got {tuple(q.shape)}")
    _check(q.shape[2] == k_cache.shape[3],
           lambda: f"q head_dim {q.shape[2]} differs from the cache head_dim {k_cache.shape[3]}")
    _check(q.shape[1] % k_cache.shape[2] == 0, lambda: f"num_q_heads {q.shape[1]} is not a "
           f"multiple of num_kv_heads {k_cache.shape[2]}")
    _check(q.dtype == k_cache.dtype,
           lambda: f"q dtype {q.dtype} differs from the cache dtype {k_cache.dtype}")
    _check(block_tables.dim() == 2 and block_tables.dtype == torch.int32,
           lambda: f"block_tables must be int32 [num_seqs, max_blocks], got {block_tables.dtype} "
           f"{tuple(block_tables.shape)}")
    num_seqs = block_tables.shape[0]
    _check(seq_lens.shape == (num_seqs,) and seq_lens.dtype == torch.int32,
           lambda: f"seq_lens must be int32 [{num_seqs}], got {seq_lens.dtype} "
           f"{tuple(seq_lens.shape)}")
    _check(query_start_loc.shape == (num_seqs + 1,) and query_start_loc.dtype == torch.int32,
           lambda: f"query_start_loc must be int32 [{num_seqs + 1}], got {query_start_loc.dtype} "
           f"{tuple(query_start_loc.shape)}")
    if out is not None:
        _check(out.shape == q.shape and out.dtype == q.dtype,
               lambda: f"out must match q ({q.dtype} {tuple(q.shape)}), got {out.dtype} "
               f"{tuple(out.shape)}")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, *,
                    sliding_window: int | None = None, softcap: float | None = None,
                    max_seq_len: int | None = None, max_query_len: int | None = None,
                    out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context (varlen).

    q: [num_tokens, num_q_heads, head_dim], the new tokens of all sequences concatenated;
    sequence i owns rows query_start_loc[i]:query_start_loc[i+1], which sit at positions
    seq_lens[i]-q_len .. seq_lens[i]-1 (seq_lens counts this step's tokens). A query at
    position p attends keys at positions in (p - sliding_window, p]. Softcap is applied to the
    scaled scores before masking. max_seq_len and max_query_len are optional host-side hints
    that spare device syncs. Returns `out` (allocated when None) in q's dtype.

    The torch backend plans a step once and reuses the plan while the very same
    block_tables / seq_lens / query_start_loc tensors come back unchanged (every layer of a
    step); a change made through torch is seen, one made through a numpy view of their
    memory is not: pass new tensors for a new step."""
    _check_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out)
    if out is None:
        out = torch.empty_like(q)
    if max_query_len is None and query_start_loc.device.type == "cpu":
        max_query_len = int(query_start_loc.diff().max()) if seq_lens.numel() else 0
    return _backend(q.device, backend).paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
        sliding_window=sliding_window, softcap=softcap, max_seq_len=max_seq_len,
        max_query_len=max_query_len, out=out)


def copy_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], src_dst: Pairs, *,
                backend: str | None = None) -> None:
    """Copies whole blocks (copy-on-write) in every layer's caches: each (src, dst) pair
    copies block src to block dst. Destinations must not also be sources."""
    if not kv_caches:
        return
    for k_cache, v_cache in kv_caches:
        _check_cache_pair(k_cache, v_cache)
    _backend(kv_caches[0][0].device, backend).copy_blocks(kv_caches, src_dst)


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, mapping: Pairs, *,
                backend: str | None = None) -> None:
    """Copies blocks of one cache tensor into another, possibly on another device
    (swap out to host memory / swap in); mapping holds (src_block, dst_block) pairs."""
    _check(src_cache.shape[1:] == dst_cache.shape[1:] and src_cache.dtype == dst_cache.dtype,
           lambda: f"caches differ: {src_cache.dtype} {tuple(src_cache.shape)} vs "
           f"{dst_cache.dtype} {tuple(dst_cache.shape)} (all but num_blocks must match)")
    device = src_cache.device if src_cache.device.type != "cpu" else dst_cache.device
    _backend(device, backend).swap_blocks(src_cache, dst_cache, mapping)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, *, backend: str | None = None):
    """RMSNorm over the last dimension with Hugging Face's numerics (fp32 statistics; in half
    types the normalized value is rounded to x's dtype before the weight scales it). With
    `residual`, normalizes x + residual and returns (normed, x + residual)."""
    _check(x.dim() >= 1 and weight.shape == (x.shape[-1],),
           lambda: f"weight must be [{x.shape[-1]}] (x's last dimension), got "
           f"{tuple(weight.shape)}")
    _check(residual is None or residual.shape == x.shape,
           lambda: f"residual shape {None if residual is None else tuple(residual.shape)} differs "
           f"from x shape {tuple(x.shape)}")
    return _layer_op(x.device, backend, "rms_norm")(x, weight, eps, residual)


def silu_and_mul(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dimension (the SiLU-gated MLP)."""
    _check(x.shape[-1] % 2 == 0,
           lambda: f"the last dimension of x must be even, got {x.shape[-1]}")
    return _layer_op(x.device, backend, "silu_and_mul")(x)


def gelu_tanh_and_mul(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """gelu(gate) * up, GELU's tanh approximation, for x = [gate | up] along the last dimension
    (GeGLU, Gemma's MLP)."""
    _check(x.shape[-1] % 2 == 0,
           lambda: f"the last dimension of x must be even, got {x.shape[-1]}")
    return _layer_op(x.device, backend, "gelu_tanh_and_mul")(x)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                     backend: str | None = None) -> torch.Tensor:
    """Rotates x [tokens, heads, head_dim] in the half-rotation layout of Hugging Face Llama:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with cos and sin [tokens, 1, half] (or
    [tokens, half]) for each token's position. half is at most head_dim // 2: x1 and x2 are the
    first 2 * half values of each head, and the values past them pass unchanged (partial
    rotary, as Phi-4-mini's). Returns a new tensor."""
    _check(x.dim() == 3, lambda: f"x must be [tokens, heads, head_dim], got {tuple(x.shape)}")
    tokens, half = x.shape[0], cos.shape[-1]
    _check(0 < half <= x.shape[-1] // 2,
           lambda: f"cos and sin must hold 1 to head_dim // 2 = {x.shape[-1] // 2} values per "
           f"token, got {half}")
    _check(cos.numel() == sin.numel() == tokens * half and sin.shape[-1] == half,
           lambda: f"cos and sin must hold [{tokens}, {half}] values, got "
           f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    return _layer_op(x.device, backend, "rotary_embedding")(x, cos, sin)


def pack_weight(weight: torch.Tensor | QuantizedWeight) -> PackedWeight | QuantizedPanels:
    """A linear layer's weight packed once for ``packed_linear`` (in column panels:
    ``packed_weight``): a tensor [out_features, in_features], fp32 or bf16 (widened to fp32 as
    it is multiplied), gives a ``PackedWeight``; a ``QuantizedWeight`` (4 or 8 bits) gives
    ``QuantizedPanels``, which stay low-bit in memory and are dequantized as they are
    multiplied. Its group size must be a multiple of 8 inputs in 4 bits, of 4 in 8 bits."""
    if isinstance(weight, QuantizedWeight):
        return _pack_quantized(weight)
    _check(isinstance(weight, torch.Tensor), lambda: f"weight must be a tensor or a "
           f"QuantizedWeight, got {type(weight).__name__}")
    _check(weight.dim() == 2 and weight.shape[0] > 0 and weight.shape[1] > 0,
           lambda: f"weight must be [out_features, in_features], both > 0, got "
           f"{tuple(weight.shape)}")
    _check(weight.dtype in packed_weight.DTYPES,
           lambda: f"weight must be fp32 or bf16, got {weight.dtype}")
    return packed_weight.pack(weight)


def _pack_quantized(weight: QuantizedWeight) -> QuantizedPanels:
    check_quantized(weight)
    per_word = packed_weight.codes_per_word(weight.bits)
    _check(weight.group_size % per_word == 0, lambda: f"weight.group_size {weight.group_size} "
           f"must be a multiple of {per_word} to pack {weight.bits}-bit codes ({per_word} to a "
           f"32-bit word)")
    _check(weight.out_features > 0 and weight.in_features > 0, lambda: f"weight must have "
           f"out_features and in_features > 0, got {weight.out_features} x {weight.in_features}")
    _check(int(weight.codes.max()) < 2**weight.bits, lambda: f"weight.codes must be below "
           f"2**{weight.bits}, got {int(weight.codes.max())}")
    return packed_weight.pack_quantized(weight)


def check_packed(packed: PackedWeight | QuantizedPanels) -> None:
    """Raises KernelInputError unless ``packed`` is a packed weight as ``pack_weight`` makes
    them, naming the first field that is not."""
    if isinstance(packed, QuantizedPanels):
        _check_quantized_panels(packed)
        return
    _check(isinstance(packed, PackedWeight), lambda: f"packed must be a PackedWeight or "
           f"QuantizedPanels (from pack_weight), got {type(packed).__name__}")
    panels = packed.panels
    _check(panels.shape == packed.expected_shape and panels.dtype in packed_weight.DTYPES
           and panels.is_contiguous(), lambda: f"packed.panels must be contiguous fp32 or bf16 "
           f"{packed.expected_shape} for {packed.out_features} x {packed.in_features} features "
           f"(as pack_weight makes them), got {panels.dtype} {tuple(panels.shape)}")


def _check_quantized_panels(packed: QuantizedPanels) -> None:
    _check(packed.bits in quantized.BITS and packed.group_size > 0
           and packed.in_features % packed.group_size == 0
           and packed.group_size % packed.codes_per_word == 0,
           lambda: f"packed.bits {packed.bits} and packed.group_size {packed.group_size} do not "
           f"fit {packed.in_features} inputs (as pack_weight makes them)")
    _check(packed.bits == 4 or not packed.int8_activations, lambda: f"packed.int8_activations "
           f"needs 4-bit weights, got {packed.bits} bits")
    codes_shape, group_shape = packed.expected_shapes
    _check(packed.codes.shape == codes_shape and packed.codes.dtype == torch.int32
           and packed.codes.is_contiguous(), lambda: f"packed.codes must be contiguous int32 "
           f"{codes_shape}, got {packed.codes.dtype} {tuple(packed.codes.shape)}")
    for name in ("scales", "offsets"):
        t = getattr(packed, name)
        _check(t.shape == group_shape and t.dtype in (torch.float16, torch.float32)
               and t.dtype == packed.scales.dtype and t.is_contiguous()
               and t.device == packed.device, lambda name=name, t=t: f"packed.{name} must be "
               f"contiguous fp16 or fp32 {group_shape} (as packed.scales) on {packed.device}, "
               f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    order = packed.input_order
    _check(order is None or (order.shape == (packed.in_features,) and order.dtype == torch.int64
                             and order.is_contiguous() and order.device == packed.device),
           lambda: f"packed.input_order must be None or contiguous int64 "
           f"[{packed.in_features}] on {packed.device}, got {order.dtype} {tuple(order.shape)}")


def packed_linear(x: torch.Tensor, packed: PackedWeight | QuantizedPanels,
                  bias: torch.Tensor | None = None, *,
                  backend: str | None = None) -> torch.Tensor:
    """x @ W.T + bias for the weight W that ``pack_weight`` packed: x fp32 [rows, in_features]
    (rows may be 0), bias fp32 [out_features] or None; returns a new fp32 [rows, out_features].
    For ``QuantizedPanels`` W is the dequantized weight, in the inputs' natural order, and x
    may also be bf16 or fp16: W is then rounded to x's dtype and the products summed in fp32
    (as GPU w4a16 kernels multiply on tensor cores; the triton backend does so natively).
    With ``packed.int8_activations`` (4 bits, ``QuantizedPanels.with_int8_activations``) x is
    first rounded as ``quantized.int8_rounded`` says, in blocks of 32 inputs with a scale each
    (as llama.cpp's Q8 blocks): the cpu backend multiplies the int8 values by the codes in
    integers, the others multiply the rounded fp32 x.
    The cpu backend computes each output as one chain of fused multiply-adds over the inputs in
    order (the ``input_order`` of quantized weights), the bias added last, so a row's result
    does not depend on the rest of the batch."""
    check_packed(packed)
    dtypes = HALF_INPUT_DTYPES if isinstance(packed, QuantizedPanels) else (torch.float32,)
    _check(x.dim() == 2 and x.shape[1] == packed.in_features and x.dtype in dtypes,
           lambda: f"x must be [rows, {packed.in_features}] (in_features of packed) in "
           f"{' or '.join(str(d)[6:] for d in dtypes)}, got {x.dtype} {tuple(x.shape)}")
    _check(bias is None or (bias.shape == (packed.out_features,) and bias.dtype == torch.float32),
           lambda: f"bias must be fp32 [{packed.out_features}] (out_features of packed), got "
           f"{bias.dtype} {tuple(bias.shape)}")
    _check(x.device == packed.device and (bias is None or bias.device == x.device),
           lambda: f"x, packed and bias must be on one device, got {x.device}, "
           f"{packed.device} and {None if bias is None else bias.device}")
    return _layer_op(x.device, backend, "packed_linear")(x, packed, bias)


def bf16_dot_rows(device: torch.device | str, *, backend: str | None = None) -> int | None:
    """The rows from which the backend selected for ``device`` multiplies bf16 x by low-bit
    weights with bf16 dot products (``packed_linear``'s bf16 contract, faster there than x
    widened to fp32: the cpu backend with AVX512-BF16), or None where it has none."""
    rows = getattr(_backend(torch.device(device), backend), "bf16_dot_rows", None)
    return None if rows is None else rows()


def embedding_rows(packed: PackedWeight | QuantizedPanels, ids: torch.Tensor, *,
                   backend: str | None = None) -> torch.Tensor:
    """Rows ``ids`` (int64 [n], on packed's device) of the weight that ``pack_weight`` packed,
    in fp32 [n, in_features] (dequantized for ``QuantizedPanels``): the lookup of an embedding
    table [vocab, hidden] kept packed, which then serves as the tied LM head too. An id outside
    [0, out_features) raises KernelInputError (on the CPU; elsewhere the check would wait on
    the device)."""
    check_packed(packed)
    _check(ids.dim() == 1 and ids.dtype == torch.int64 and ids.device == packed.device,
           lambda: f"ids must be int64 [n] on {packed.device}, got {ids.dtype} "
           f"{tuple(ids.shape)} on {ids.device}")
    return _layer_op(packed.device, backend, "embedding_rows")(packed, ids)


def argmax(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Row-wise index (int64) of the first maximum of x [rows, cols]: greedy sampling over
    logits in their own dtype (converting bf16 to fp32 changes no order). A NaN counts as the
    maximum, as in torch.max."""
    _check(x.dim() == 2 and x.shape[1] > 0,
           lambda: f"x must be [rows, cols] with cols > 0, got {tuple(x.shape)}")
    return _layer_op(x.device, backend, "argmax")(x)


def route_experts(logits: torch.Tensor, top_k: int, normalize: bool = True, *,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixture of experts' routing of each row of logits [rows, num_experts]: the top_k
    largest softmax probabilities (computed in fp32) in descending order, renormalized to sum
    to 1 when ``normalize``, and their experts; returns (weights fp32, experts int64), both
    [rows, top_k]. A NaN ranks above every number, as in torch.topk; equal probabilities take
    the lower expert first on the cpu backend (torch.topk does not say which)."""
    _check(logits.dim() == 2 and 1 <= top_k <= logits.shape[1],
           lambda: f"logits must be [rows, num_experts] with 1 <= top_k <= num_experts, got "
                   f"{tuple(logits.shape)} and top_k {top_k}")
    return _layer_op(logits.device, backend, "route_experts")(logits, top_k, normalize)


LORA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_lora_slots(token_slots: torch.Tensor, tokens: int, num_slots: int) -> None:
    _check(token_slots.dim() == 1 and token_slots.shape[0] == tokens
           and token_slots.dtype == torch.int32,
           lambda: f"token_slots must be int32 [{tokens}] (one per row of x), got "
           f"{token_slots.dtype} {tuple(token_slots.shape)}")
    if tokens and token_slots.device.type == "cpu":  # elsewhere the check would wait on the device
        low, high = int(token_slots.min()), int(token_slots.max())
        _check(low >= -1 and high < num_slots, lambda: f"token_slots must lie in [-1, "
               f"{num_slots}) (-1: no adapter; num_slots of the weights), got [{low}, {high}]")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor, *,
                backend: str | None = None) -> torch.Tensor:
    """The first half of a mixed batch's LoRA deltas, each row through its own adapter:
    x [tokens, in_features] (fp32, bf16 or fp16), lora_a [num_slots, rank, in_features] in x's
    dtype (the adapters' A matrices stacked by slot), token_slots int32 [tokens] in
    [-1, num_slots) (-1: no adapter). Returns fp32 [tokens, rank]: row t is
    x[t] @ lora_a[token_slots[t]].T summed in fp32, zeros where the slot is -1."""
    _check(x.dim() == 2 and x.dtype in LORA_DTYPES,
           lambda: f"x must be [tokens, in_features] fp32, bf16 or fp16, got {x.dtype} "
           f"{tuple(x.shape)}")
    _check(lora_a.dim() == 3 and lora_a.shape[2] == x.shape[1] and lora_a.dtype == x.dtype,
           lambda: f"lora_a must be [num_slots, rank, {x.shape[1]}] in x's dtype {x.dtype}, got "
           f"{lora_a.dtype} {tuple(lora_a.shape)}")
    _check_lora_slots(token_slots, x.shape[0], lora_a.shape[0])
    return _layer_op(x.device, backend, "lora_shrink")(x, lora_a, token_slots)


def lora_expand(out: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor,
                token_slots: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The second half: out[t] += h[t] @ lora_b[token_slots[t]].T in place for every row
    with an adapter (the product summed in fp32, added to out in fp32 and rounded once to
    out's dtype); rows whose slot is -1 are left as they are. out [tokens, out_features]
    (fp32, bf16 or fp16, unit stride along the features), h fp32 [tokens, rank] (from
    ``lora_shrink``), lora_b [num_slots, out_features, rank] in out's dtype. Returns out."""
    _check(out.dim() == 2 and out.dtype in LORA_DTYPES and out.stride(-1) == 1,
           lambda: f"out must be [tokens, out_features] fp32, bf16 or fp16 with unit stride "
           f"along the features, got {out.dtype} {tuple(out.shape)}")
    _check(h.dim() == 2 and h.shape[0] == out.shape[0] and h.dtype == torch.float32,
           lambda: f"h must be fp32 [{out.shape[0]}, rank], got {h.dtype} {tuple(h.shape)}")
    _check(lora_b.dim() == 3 and lora_b.shape[1:] == (out.shape[1], h.shape[1])
           and lora_b.dtype == out.dtype,
           lambda: f"lora_b must be [num_slots, {out.shape[1]}, {h.shape[1]}] in out's dtype "
           f"{out.dtype}, got {lora_b.dtype} {tuple(lora_b.shape)}")
    _check_lora_slots(token_slots, out.shape[0], lora_b.shape[0])
    _layer_op(out.device, backend, "lora_expand")(out, h, lora_b, token_slots)
    return out
