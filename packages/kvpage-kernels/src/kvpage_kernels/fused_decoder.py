"""A Llama-family decoder stack run for a whole decode step in one call (cpu backend).

A decode step of a small model on the CPU is dozens of short ops per layer, and between two
GEMMs, each streaming megabytes of weights through the caches, the Python that dispatches
the next op runs with cold caches: measured on SmolLM2-135M, the glue and dispatch cost more
than the norms, rotary and KV writes themselves. ``FusedDecoder`` runs the ops of the
per-layer path with the same kernels in the same order (``rms_norm`` with the residual add,
the QKV GEMM, rotary, ``write_kv``, decode attention, the output GEMM, ``rms_norm``, the
gate/up GEMM, ``silu_and_mul``, the down GEMM) for every layer inside one C call.

The GEMM depends on the layers' weight format (``WeightFormat``, told by the weights' type
and dtype). Weights packed by ``pack_weight``, fp32 ``PackedWeight`` or low-bit
``QuantizedPanels`` (4 or 8 bits, each weight its own group size and input order; the stack
runs in fp32), are multiplied by the cpu backend's own GEMM, the C function that
``packed_linear`` calls, and fp32 weights packed by
``torch.ops.mkl._mkl_reorder_linear_weight`` by the packed sgemm that torch's
``torch.ops.mkl._mkl_linear`` calls, its address taken from the MKL inside torch: either way
the results are bit-identical to the per-layer path's with the same weights. bf16 weights are
multiplied as they are by MKL's ``gemm_bf16bf16f32``: fp32 products and sums rounded to bf16
once, as oneDNN's bf16 linear does, though the summation order may differ (results agree to
bf16 rounding). Where no C++ compiler is found (or, for the formats that call MKL, torch has
none), ``unavailable_reason(weight_format)`` says why and callers keep their per-layer path.

Layers may carry LoRA adapters (``LoRAWeights`` per projection, the layout of
``lora_shrink``/``lora_expand``): a step given each row's adapter slot adds every row's
deltas right after each projection's GEMM with the same kernels as those ops, so the stack
still computes what the per-layer path computes.

The family options of ``DecoderShape`` follow the layer modules' too: query and key norms
(``qk_norm``: "head", each head, as Qwen3; "full", each whole projection, as OLMo 2; with
``rms_norm`` before rotary), norms after attention and the MLP instead of before them
(``norm_placement`` "post", OLMo 2) or both ("sandwich", Gemma), a softmax ``scale`` other
than head_dim ** -0.5 and a ``residual_multiplier`` on each block's output (Granite), the MLP's
``activation`` ("silu" or "gelu_tanh", the ``silu_and_mul`` and ``gelu_tanh_and_mul`` kernels)
and the attention scores' ``softcap`` (Gemma 2). Each layer says whether it slides
(``DecoderLayerWeights.sliding``, within ``DecoderShape.sliding_window``) and whether it
rotates by the step's local cos and sin (``local_rope``, Gemma 3's sliding layers).

A layer's MLP may be a mixture of experts instead (``DecoderLayerWeights.router`` and
``experts``, with ``DecoderShape.num_experts``, ``top_k``, ``normalize_top_k`` and
``expert_intermediate_size``), computed op for op as the runtime's ``SparseMoE``: the router's
GEMM (its weight may be in a format of its own: it stays dense where the experts are low-bit),
``route_experts``, the (token, choice) pairs grouped by expert, each expert's SiLU-gated MLP over
its pairs with the layers' GEMM, and each token's choices mixed by their weights in fp32.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import cpu_backend
from .cpu_backend import _DTYPE_CODES, _f32, _i32, _i64, _ptr
from .errors import KernelBackendUnavailable, KernelInputError
from .ops import check_packed
from .packed_weight import PackedWeight, QuantizedPanels

Weight = torch.Tensor | PackedWeight | QuantizedPanels


class WeightFormat(enum.IntEnum):
    """How the layers hold their projection weights, and so which GEMM multiplies by them (the
    values are the C side's codes)."""

    MKL_PACKED = 0  # fp32, packed by torch.ops.mkl._mkl_reorder_linear_weight: MKL's sgemm
    PANELS = 1  # fp32 PackedWeight from pack_weight: the cpu backend's packed_linear GEMM
    BF16 = 2  # bf16 [out, in], contiguous: MKL's gemm_bf16bf16f32
    QUANTIZED = 3  # QuantizedPanels from pack_weight, fp32 stack: the packed_linear GEMM


@dataclass(frozen=True)
class DecoderShape:
    """The dimensions every layer of the stack shares."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    sliding_window: int | None = None
    scale: float | None = None  # None: head_dim ** -0.5
    residual_multiplier: float = 1.0
    qk_norm: str | None = None  # "head" or "full"
    norm_placement: str = "pre"  # or "post", "sandwich"
    activation: str = "silu"  # or "gelu_tanh"
    softcap: float | None = None
    rotary_dim: int | None = None  # None: head_dim; fewer: partial rotary (cos, sin (rotary_dim + 1) // 2 wide)
    num_experts: int = 0  # of the mixture-of-experts layers; 0: none
    top_k: int = 0  # experts per token
    normalize_top_k: bool = True  # the top_k weights renormalized to sum to 1
    expert_intermediate_size: int = 0


@dataclass
class DecoderLayerWeights:
    """One layer, all in one dtype (fp32 or bf16): norms, projection weights (q/k/v and gate/up
    stacked along the output, one GEMM each, [out, in] in one ``WeightFormat``: in fp32 a
    ``PackedWeight`` or ``QuantizedPanels`` from ``pack_weight`` or an MKL pack, in bf16 the
    plain contiguous tensor) and the layer's KV cache [num_blocks, block_size, num_kv_heads,
    head_dim]. With norms after the blocks there is no ``input_norm`` and a
    ``post_feedforward_norm``, with norms around them both and a ``pre_feedforward_norm``;
    ``q_norm`` and ``k_norm`` are [head_dim] per head or [num_heads * head_dim] and
    [num_kv_heads * head_dim] over the projections. A mixture-of-experts layer has no
    ``gate_up`` and ``down`` but a ``router`` [num_experts, hidden] (dense, in a format of its
    own) and ``experts``, each expert's (gate_up, down) in the layers' format."""

    input_norm: torch.Tensor | None
    qkv: Weight
    qkv_bias: torch.Tensor | None
    o: Weight
    post_attention_norm: torch.Tensor
    gate_up: Weight | None
    down: Weight | None
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    lora: tuple[LoRAWeights | None, ...] | None = None  # qkv, o, gate_up, down
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    pre_feedforward_norm: torch.Tensor | None = None
    post_feedforward_norm: torch.Tensor | None = None
    sliding: bool = True  # within the shape's sliding_window, if it has one
    local_rope: bool = False
    router: Weight | None = None
    experts: list[tuple[Weight, Weight]] | None = None

    @property
    def projections(self) -> list[Weight]:
        """The weights multiplied in the layers' format: qkv, o, then gate_up and down or each
        expert's."""
        mlp = [self.gate_up, self.down] if self.experts is None else [
            t for pair in self.experts for t in pair]
        return [self.qkv, self.o, *mlp]


@dataclass
class LoRAWeights:
    """One projection's adapter slots: ``a`` [num_slots, shards * rank, in_features] (as
    ``lora_shrink`` takes it, each shard's ranks one block) and ``b`` one [num_slots,
    shard_out_features, rank] per shard (as ``lora_expand`` takes it), the shards in the
    order of the projection's output; all contiguous, in the stack's dtype."""

    a: torch.Tensor
    b: list[torch.Tensor]


class _Shape(ctypes.Structure):
    _fields_ = [("sgemm_compute", _ptr), ("gemm_bf16", _ptr), ("num_layers", _i64), ("hidden", _i64), ("intermediate", _i64),
                ("num_heads", _i64), ("num_kv_heads", _i64), ("head_dim", _i64),
                ("block_size", _i64), ("num_slots", _i64), ("eps", _f32), ("scale", _f32),
                ("window", _i32), ("weight_format", _i32), ("lora_num_slots", _i64),
                ("lora_rank", _i64), ("residual_multiplier", _f32), ("qk_norm", _i32),
                ("norm_placement", _i32), ("activation", _i32), ("softcap", _f32),
                ("rotary_half", _i64), ("num_experts", _i64), ("top_k", _i64),
                ("expert_intermediate", _i64), ("normalize_top_k", _i32), ("router_format", _i32)]

# DecoderShape's options -> the C side's codes
_QK_NORMS = {None: 0, "head": 1, "full": 2}
_NORM_PLACEMENTS = {"pre": 0, "post": 1, "sandwich": 2}
_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
# the norms of a layer, by norm placement
_PLACED_NORMS = {"pre": ("input_norm", "post_attention_norm"),
                 "post": ("post_attention_norm", "post_feedforward_norm"),
                 "sandwich": ("input_norm", "post_attention_norm", "pre_feedforward_norm",
                              "post_feedforward_norm")}


# DecoderLayerWeights' tensors in the order of the C side's DecoderLayer
_LAYER_TENSORS = ("qkv", "qkv_bias", "o", "gate_up", "down", "input_norm", "post_attention_norm",
                  "k_cache", "v_cache", "q_norm", "k_norm", "pre_feedforward_norm",
                  "post_feedforward_norm")


class _LoRAProjection(ctypes.Structure):
    _fields_ = [("a", _ptr), ("b", _ptr * 3), ("sizes", _i64 * 3), ("shards", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [*((name, _ptr) for name in _LAYER_TENSORS), ("lora", _LoRAProjection * 4),
                ("sliding", _i32), ("local_rope", _i32), ("router", _ptr), ("experts", _ptr)]


class _Step(ctypes.Structure):
    _fields_ = [("rows", _i64), ("cos", _ptr), ("sin", _ptr), ("cs_stride", _i64),
                ("slot_mapping", _ptr), ("block_tables", _ptr), ("table_stride", _i64),
                ("seq_lens", _ptr), ("query_start_loc", _ptr), ("lora_slots", _ptr),
                ("local_cos", _ptr), ("local_sin", _ptr), ("local_cs_stride", _i64)]


@functools.cache
def _mkl_function(name: str) -> int:
    """Address of MKL's Fortran routine ``name`` in torch's CPU library."""
    if not torch.backends.mkl.is_available():
        raise KernelBackendUnavailable("the fused decoder needs torch built with MKL")
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        return ctypes.cast(getattr(ctypes.CDLL(path), name), ctypes.c_void_p).value
    except (OSError, AttributeError) as e:
        raise KernelBackendUnavailable(f"MKL's {name} is not exported by torch: {e}") from e


def _decoder_stack() -> Callable[..., int]:
    """kvpage_decoder_stack of the cpu backend's library for the CPU tier in use."""
    return _declared_stack(cpu_backend.library())


@functools.cache
def _declared_stack(lib: ctypes.CDLL) -> Callable[..., int]:
    entry = lib.kvpage_decoder_stack
    entry.argtypes = [_i32, ctypes.POINTER(_Shape), ctypes.POINTER(_Layer), ctypes.POINTER(_Step),
                      _ptr, _ptr]
    entry.restype = ctypes.c_int64
    return entry


# The MKL routine each weight format multiplies with (the panels use the cpu backend's GEMM).
_MKL_ROUTINES = {WeightFormat.MKL_PACKED: "SGEMM_COMPUTE", WeightFormat.BF16: "GEMM_BF16BF16F32"}


def _mkl_address(weight_formats: set[WeightFormat], routine: str) -> int:
    """The routine's address where one of ``weight_formats`` calls it, else 0 (never
    called)."""
    called = any(_MKL_ROUTINES.get(f) == routine for f in weight_formats)
    return _mkl_function(routine) if called else 0


def unavailable_reason(weight_format: WeightFormat = WeightFormat.PANELS) -> str | None:
    """Why the fused decoder cannot run here for weights of ``weight_format`` (no compiler;
    for MKL-packed fp32 and bf16 weights also no MKL in torch), or None."""
    try:
        _decoder_stack()
        if weight_format in _MKL_ROUTINES:
            _mkl_function(_MKL_ROUTINES[weight_format])
    except (KernelBackendUnavailable, OSError) as e:
        return str(e)
    return None


def _address(t: torch.Tensor | PackedWeight | None) -> int | None:
    if t is None:
        return None
    if isinstance(t, PackedWeight):
        return t.panels.data_ptr()
    return torch.ops.mkldnn.data_ptr(t) if t.is_mkldnn else t.data_ptr()


class FusedDecoder:
    """``decoder(hidden, cos, sin, slot_mapping, block_tables, seq_lens, query_start_loc)``
    runs every layer for one decode step (each sequence one new token) and returns
    ``(mlp_output, residual)`` of the last layer; the model's final norm adds the two.

    The layers' tensors must stay alive and in place while the decoder is used (it holds
    references to them); a KV cache that is reallocated needs a new decoder.
    """

    def __init__(self, shape: DecoderShape, layers: list[DecoderLayerWeights]) -> None:
        self.weight_format, router_format = _check_layers(shape, layers)
        formats = {self.weight_format, router_format} - {None}
        for weight_format in formats:
            reason = unavailable_reason(weight_format)
            if reason is not None:
                raise KernelBackendUnavailable(reason)
        self.shape = shape
        self._layers = layers
        cache = layers[0].k_cache
        self.dtype = layers[0].post_attention_norm.dtype
        self.lora_num_slots, self.lora_rank = _check_lora(shape, layers, self.dtype)
        self._shape = _Shape(
            _mkl_address(formats, "SGEMM_COMPUTE"), _mkl_address(formats, "GEMM_BF16BF16F32"),
            len(layers),
            shape.hidden_size, shape.intermediate_size, shape.num_heads, shape.num_kv_heads,
            shape.head_dim, cache.shape[1],
            cache.shape[0] * cache.shape[1], shape.rms_norm_eps,
            shape.head_dim**-0.5 if shape.scale is None else shape.scale,
            shape.sliding_window or 0, self.weight_format, self.lora_num_slots, self.lora_rank,
            shape.residual_multiplier, _QK_NORMS[shape.qk_norm],
            _NORM_PLACEMENTS[shape.norm_placement], _ACTIVATIONS[shape.activation],
            shape.softcap or 0.0, ((shape.rotary_dim or shape.head_dim) + 1) // 2,
            shape.num_experts, shape.top_k, shape.expert_intermediate_size,
            shape.normalize_top_k, -1 if router_format is None else router_format)
        self._matrices: list[cpu_backend.QuantizedMatrix] = []  # what _c_layers points to
        self._expert_tables: list[ctypes.Array] = []  # likewise
        self._c_layers = (_Layer * len(layers))(*[
            _Layer(*(self._address(getattr(w, name)) for name in _LAYER_TENSORS),
                   (_LoRAProjection * 4)(*map(_lora_projection, w.lora or (None,) * 4)),
                   w.sliding, w.local_rope, self._address(w.router), self._expert_table(w))
            for w in layers])
        self.local_rope = any(w.local_rope for w in layers)

    @property
    def has_lora(self) -> bool:
        """Whether the layers carry LoRA slots (then a step may give ``lora_slots``)."""
        return self.lora_num_slots > 0

    def _address(self, t: Weight | None) -> int | None:
        """Where the C side finds t: a quantized weight's C description, kept alive here."""
        if not isinstance(t, QuantizedPanels):
            return _address(t)
        self._matrices.append(cpu_backend.quantized_matrix(t))
        return ctypes.addressof(self._matrices[-1])

    def _expert_table(self, w: DecoderLayerWeights) -> int | None:
        """The address of the layer's experts' weights, gate_up and down for each in turn
        (kept alive here), or None for a layer without experts."""
        if w.experts is None:
            return None
        table = (_ptr * (2 * len(w.experts)))(*(self._address(t) for pair in w.experts
                                                for t in pair))
        self._expert_tables.append(table)
        return ctypes.addressof(table)

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 query_start_loc: torch.Tensor, lora_slots: torch.Tensor | None = None,
                 local: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [n, hidden_size] (the embeddings) and cos/sin [n, 1, head_dim // 2] (rows may
        be strided) in the layers' dtype; slot_mapping int64 [n]; block_tables int32
        [n, max_blocks]; seq_lens int32 [n]; query_start_loc int32 [n + 1] = 0, 1, ..., n;
        lora_slots int32 [n], each row's adapter slot (-1: none), or None: no adapter;
        ``local``: the (cos, sin) of the layers with ``local_rope``, shaped as cos and sin."""
        rows = hidden.shape[0]
        if (hidden.shape != (rows, self.shape.hidden_size) or seq_lens.shape[0] != rows
                or slot_mapping.shape[0] != rows
                or not hidden.dtype == cos.dtype == sin.dtype == self.dtype):
            raise KernelInputError(
                f"the fused decoder takes one token per sequence: hidden [{rows}, "
                f"{self.shape.hidden_size}], cos and sin in {self.dtype} and {rows} sequences, "
                f"got hidden {list(hidden.shape)} {hidden.dtype}, cos {cos.dtype} and "
                f"{seq_lens.shape[0]} sequences")
        out = hidden.contiguous().clone()
        residual = torch.empty_like(out)
        if rows == 0:
            return out, residual
        if (local is None) == self.local_rope or (
                local is not None and not local[0].dtype == local[1].dtype == self.dtype):
            raise KernelInputError(f"local cos and sin (in {self.dtype}) must be given exactly "
                                   "when a layer has local_rope")
        cos, sin = cos.reshape(rows, -1), sin.reshape(rows, -1)
        local_cos, local_sin = (None, None) if local is None else (
            local[0].reshape(rows, -1), local[1].reshape(rows, -1))
        tables, slots = block_tables.contiguous(), slot_mapping.contiguous()
        lens, starts = seq_lens.contiguous(), query_start_loc.contiguous()
        adapters = None if lora_slots is None else self._checked_lora_slots(lora_slots, rows)
        step = _Step(rows, cos.data_ptr(), sin.data_ptr(), cos.stride(0), slots.data_ptr(),
                     tables.data_ptr(), tables.stride(0), lens.data_ptr(), starts.data_ptr(),
                     None if adapters is None else adapters.data_ptr(),
                     *((None, None, 0) if local_cos is None else (
                         local_cos.data_ptr(), local_sin.data_ptr(), local_cos.stride(0))))
        bad = _decoder_stack()(_DTYPE_CODES[self.dtype], ctypes.byref(self._shape),
                               self._c_layers, ctypes.byref(step), out.data_ptr(),
                               residual.data_ptr())
        if bad >= 0:
            raise cpu_backend.slot_outside_cache(slots, bad, self._shape.num_slots)
        return out, residual

    def _checked_lora_slots(self, lora_slots: torch.Tensor, rows: int) -> torch.Tensor:
        if not self.has_lora:
            raise KernelInputError("lora_slots given, but the layers carry no LoRA weights")
        if lora_slots.shape != (rows,) or lora_slots.dtype != torch.int32:
            raise KernelInputError(f"lora_slots must be int32 [{rows}], got {lora_slots.dtype} "
                                   f"{tuple(lora_slots.shape)}")
        low, high = int(lora_slots.min()), int(lora_slots.max())
        if low < -1 or high >= self.lora_num_slots:
            raise KernelInputError(f"lora_slots must lie in [-1, {self.lora_num_slots}), got "
                                   f"[{low}, {high}]")
        return lora_slots.contiguous()


def _lora_projection(weights: LoRAWeights | None) -> _LoRAProjection:
    if weights is None:
        return _LoRAProjection()
    b = [t.data_ptr() for t in weights.b] + [0] * (3 - len(weights.b))
    sizes = [t.shape[1] for t in weights.b] + [0] * (3 - len(weights.b))
    return _LoRAProjection(weights.a.data_ptr(), (_ptr * 3)(*b), (_i64 * 3)(*sizes),
                           len(weights.b))


def _check_lora(shape: DecoderShape, layers: list[DecoderLayerWeights],
                dtype: torch.dtype) -> tuple[int, int]:
    """(num_slots, rank) that every layer's LoRA weights share, (0, 0) without any; raises
    KernelInputError naming the first that does not fit."""
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    features = [(shape.hidden_size, q + 2 * kv), (q, shape.hidden_size),
                (shape.hidden_size, 2 * shape.intermediate_size),
                (shape.intermediate_size, shape.hidden_size)]  # (in, out) of each projection
    found = [(i, w, features[j]) for i, layer in enumerate(layers)
             for j, w in enumerate(layer.lora or ()) if w is not None]
    for i, layer in enumerate(layers):
        if layer.experts is not None and any(w is not None for w in (layer.lora or ())[2:]):
            raise KernelInputError(f"layer {i}: a mixture of experts takes no LoRA weights")
    if not found:
        return 0, 0
    num_slots, rank = found[0][1].a.shape[0], found[0][1].b[0].shape[2]
    for i, w, (in_features, out_features) in found:
        tensors = [w.a, *w.b]
        if not (1 <= len(w.b) <= 3
                and w.a.shape == (num_slots, len(w.b) * rank, in_features)
                and sum(b.shape[1] for b in w.b) == out_features
                and all(b.shape[0] == num_slots and b.shape[2] == rank for b in w.b)
                and all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()
                        for t in tensors)):
            raise KernelInputError(
                f"layer {i}: LoRA weights must be contiguous {dtype} CPU tensors, a [{num_slots}, "
                f"shards * {rank}, {in_features}] and 1 to 3 b [{num_slots}, out, {rank}] whose "
                f"outs add up to {out_features}, got a {tuple(w.a.shape)} and b "
                f"{[tuple(b.shape) for b in w.b]}")
    return num_slots, rank


def _check_layers(shape: DecoderShape, layers: list[DecoderLayerWeights],
                  ) -> tuple[WeightFormat, WeightFormat | None]:
    """The layers' one weight format and their routers' (None: no mixture of experts); raises
    KernelInputError naming the first layer whose tensors do not fit."""
    if not layers:
        raise KernelInputError("the fused decoder needs at least one layer")
    if shape.num_heads % shape.num_kv_heads != 0:
        raise KernelInputError(f"num_heads {shape.num_heads} is not a multiple of num_kv_heads "
                               f"{shape.num_kv_heads}")
    for option, choices in (("qk_norm", _QK_NORMS), ("norm_placement", _NORM_PLACEMENTS),
                            ("activation", _ACTIVATIONS)):
        if getattr(shape, option) not in choices:
            raise KernelInputError(f"{option} must be one of {list(choices)}, got "
                                   f"{getattr(shape, option)!r}")
    dtype = layers[0].post_attention_norm.dtype
    if dtype not in _DTYPE_CODES:
        raise KernelInputError(f"the fused decoder runs in fp32 or bf16, not {dtype}")
    for i, w in enumerate(layers):
        _check_projections(shape, i, w)
    weight_format = _weight_format(0, dtype, layers[0].projections)
    routers = [(i, w.router) for i, w in enumerate(layers) if w.router is not None]
    router_format = _weight_format(routers[0][0], dtype, [routers[0][1]]) if routers else None
    cache_shape = layers[0].k_cache.shape
    for i, w in enumerate(layers):
        if _weight_format(i, dtype, w.projections) != weight_format:
            raise KernelInputError(f"layer {i}: its weights are not {weight_format.name} like "
                                   "layer 0's: every layer takes one format")
        if w.router is not None and _weight_format(i, dtype, [w.router]) != router_format:
            raise KernelInputError(f"layer {i}: its router is not {router_format.name} like "
                                   "the first router: every router takes one format")
        plain = [*_checked_norms(shape, i, w), w.k_cache, w.v_cache]
        if w.qkv_bias is not None:
            plain.append(w.qkv_bias)
        if weight_format == WeightFormat.BF16:
            plain += [*w.projections, *([] if w.router is None else [w.router])]
        if not all(t.device.type == "cpu" and t.dtype == dtype and not t.is_mkldnn
                   and t.is_contiguous() for t in plain):
            raise KernelInputError(f"layer {i}: norms, bias, KV caches (and bf16 weights) must be "
                                   f"contiguous {dtype} CPU tensors")
        if (w.k_cache.shape != cache_shape or w.v_cache.shape != cache_shape
                or cache_shape[2:] != (shape.num_kv_heads, shape.head_dim)):
            raise KernelInputError(
                f"layer {i}: KV caches must be [num_blocks, block_size, {shape.num_kv_heads}, "
                f"{shape.head_dim}] like layer 0's {list(cache_shape)}, got "
                f"{list(w.k_cache.shape)} and {list(w.v_cache.shape)}")
    return weight_format, router_format


def _checked_norms(shape: DecoderShape, i: int, w: DecoderLayerWeights) -> list[torch.Tensor]:
    """Layer i's norm weights, after checking that it has those of the shape's options and
    that each has its size."""
    d, hidden = shape.head_dim, shape.hidden_size
    per_head = shape.qk_norm == "head"
    sizes = dict.fromkeys(_PLACED_NORMS[shape.norm_placement], hidden)
    if shape.qk_norm is not None:
        sizes["q_norm"] = d if per_head else shape.num_heads * d
        sizes["k_norm"] = d if per_head else shape.num_kv_heads * d
    for name in ("input_norm", "q_norm", "k_norm", "pre_feedforward_norm",
                 "post_feedforward_norm"):
        if (getattr(w, name) is not None) != (name in sizes):
            raise KernelInputError(
                f"layer {i}: {name} must be {'given' if name in sizes else 'None'} with "
                f"qk_norm={shape.qk_norm!r} and norm_placement={shape.norm_placement!r}")
    norms = [getattr(w, name) for name in sizes]
    for name, size in sizes.items():
        if getattr(w, name).shape != (size,):
            raise KernelInputError(f"layer {i}: {name} must be [{size}], got "
                                   f"{list(getattr(w, name).shape)}")
    return norms


def _weight_format(i: int, dtype: torch.dtype, weights: list[Weight]) -> WeightFormat:
    """The one format of layer i's weights, told by their type and dtype."""
    quantized = [isinstance(t, QuantizedPanels) for t in weights]
    if dtype == torch.float32 and all(quantized):
        for t in weights:
            check_packed(t)
        if not all(t.device.type == "cpu" for t in weights):
            raise KernelInputError(f"layer {i}: quantized weights must be on the CPU")
        return WeightFormat.QUANTIZED
    packed = [isinstance(t, PackedWeight) for t in weights]
    if not any(quantized):
        if dtype == torch.bfloat16 and not any(packed):
            return WeightFormat.BF16
        if dtype == torch.float32 and all(t.dtype == torch.float32 for t in weights):
            if all(packed):
                return WeightFormat.PANELS
            if not any(packed) and all(t.is_mkldnn for t in weights):
                return WeightFormat.MKL_PACKED
    raise KernelInputError(
        f"layer {i}: the projection weights must be all fp32 PackedWeight (pack_weight), all "
        "QuantizedPanels (pack_weight of a QuantizedWeight) or all packed with "
        "torch.ops.mkl._mkl_reorder_linear_weight in fp32, plain tensors in bf16")


def _check_projections(shape: DecoderShape, i: int, w: DecoderLayerWeights) -> None:
    """The layer has a gated MLP or (with the shape's experts) a mixture of experts, and each
    projection weight is [out, in] for the shape (an MKL pack hides its own)."""
    d, hidden = shape.head_dim, shape.hidden_size
    expected = {"qkv": ((shape.num_heads + 2 * shape.num_kv_heads) * d, hidden),
                "o": (hidden, shape.num_heads * d)}
    weights = {"qkv": w.qkv, "o": w.o}
    moe = w.router is not None and w.experts is not None
    if moe and not (shape.num_experts == len(w.experts) and 1 <= shape.top_k <= len(w.experts)
                    and w.gate_up is None and w.down is None):
        raise KernelInputError(
            f"layer {i}: a mixture of experts needs the shape's num_experts "
            f"({shape.num_experts}) experts, 1 <= top_k ({shape.top_k}) <= num_experts and no "
            f"gate_up or down, got {len(w.experts)} experts")
    if moe:
        inner = shape.expert_intermediate_size
        expected["router"], weights["router"] = (shape.num_experts, hidden), w.router
        for e, (gate_up, down) in enumerate(w.experts):
            expected[f"experts[{e}].gate_up"] = (2 * inner, hidden)
            expected[f"experts[{e}].down"] = (hidden, inner)
            weights[f"experts[{e}].gate_up"], weights[f"experts[{e}].down"] = gate_up, down
    elif w.router is None and w.experts is None and w.gate_up is not None and w.down is not None:
        expected["gate_up"] = (2 * shape.intermediate_size, hidden)
        expected["down"] = (hidden, shape.intermediate_size)
        weights["gate_up"], weights["down"] = w.gate_up, w.down
    else:
        raise KernelInputError(f"layer {i}: give gate_up and down, or a router and experts")
    for name, features in expected.items():
        weight = weights[name]
        if isinstance(weight, PackedWeight | QuantizedPanels):
            actual = (weight.out_features, weight.in_features)
        elif weight.is_mkldnn:
            continue
        else:
            actual = tuple(weight.shape)
        if actual != features:
            raise KernelInputError(f"layer {i}: {name} must be [out, in] = {list(features)}, "
                                   f"got {list(actual)}")
