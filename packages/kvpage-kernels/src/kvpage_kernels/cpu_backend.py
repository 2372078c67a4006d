"""Compiled CPU backend: attention read in place from the paged cache, fused layer ops.

The torch backend has to gather each sequence's keys and values out of the cache before it can
call SDPA; this backend's C++ kernel (csrc/cpu_kernels.cpp) reads them where they lie, once per
KV head for all the query heads of its group, on OpenMP threads. It serves decode tokens and
prefill chunks in one call, in fp32 and bf16: a prefill chunk's rows go in blocks of four
consecutive rows that share one pass over their context (each row masked to its own causal
context, so its result is the one it would get alone), and a row attends only the positions
before it, where SDPA on a padded chunk computes the masked ones too. On AMD Zen 3 (two
threads, SmolLM2-135M's heads) that takes a quarter of the torch backend's time for 16 prompts
of 40 tokens and 0.5 to 0.7 for whole prompts of 256 to 2,048. A chunk after a long cached
context (256 after 1,792, 1,024 after 3,072) takes 1.1 to 1.5 times as long, since there SDPA's
GEMMs run at a higher rate than the kernel's dot products and the masked share is small
(bench/RESULTS.md). fp16 and other devices go to the torch backend, as do the block copies.
write_kv copies each row straight to its slot (no index tensors, no mask pass);
rotary_embedding is one pass in fp32 and bf16, bit-identical to the torch ops. rms_norm (with
its residual add), silu_and_mul and gelu_tanh_and_mul run as one vectorized pass each, in fp32
and bf16, instead of a chain of small torch ops, rounding where those ops round (their fp32
sums and exp differ from torch's in the last bit; GELU's tanh approximation is computed without
the cancellation in torch's 1 + tanh(u), closer to the formula than torch's fp32 result).
argmax (the greedy sampler's) is one vectorized pass per row.

lora_shrink and lora_expand (multi-LoRA, each row through its own adapter slot) run on OpenMP
threads over (block of 8 ranks, row) and (chunk of outputs, row) items, the rows grouped by
slot so that consecutive items reuse one adapter block from cache; rows without an adapter
(slot -1) cost nothing. Each output is one vector FMA chain over its inputs, its lanes summed in
a fixed tree (for expand, a vector of outputs' sums at once), in fp32 for fp32 and bf16 (fp16
goes to the torch ops): a row's results do not depend on its batch.

packed_linear is the backend's own GEMM, on weights packed once by ``pack_weight`` in column
panels of 16 outputs (``packed_weight``; fp32, or bf16 widened to fp32 in registers): OpenMP
threads share out the panels, and each panel is multiplied by every row of the batch, a tile
of rows at a time whose sums stay in registers over all the inputs (12 rows x 16 columns with
AVX-512, 6 x 16 with AVX2, 4 x 16 in portable loops), so that each weight is read from memory
once per call for up to 256 rows (once per 256 rows beyond). Each output is one FMA chain over the inputs in order, the bias added last: a
row's result does not depend on the rest of its batch. On AMD Zen 4 at decode batch sizes
(16 and 64 rows of SmolLM2-135M, two threads) it took 0.85 to 0.97 of the time of oneDNN's
packed fp32 GEMM and 0.4 to 0.6 of MKL's packed sgemm, on either tier (README); the fused
decoder stack calls the same C function.

The same kernel multiplies low-bit weights (``QuantizedPanels``, from ``pack_weight`` of a
``QuantizedWeight``: codes of 4 or 8 bits in 32-bit words within the panels, a scale and an
offset per group of inputs and column): its panel type dequantizes in registers (a code
shifted under the exponent of 1.0 reads 1 + q / 2^bits, and one FMA with the group's constants
gives q * scale + offset), so the weights stream from memory as codes, 8 bytes per input and
panel in 4 bits instead of 64 in fp32; GPTQ's input order is applied as x is copied into tiles.
With the scales and offsets of checkpoints (fp16 values, or zero points times them) the
dequantized weights equal the reference's, and the result is bit-identical to the fp32 GEMM on
the dequantized weight. A one-row tile runs four panels side by side, and the words are
prefetched ahead: a one-row decode step of SmolLM2-135M in 4 bits takes a third of the fp32
step's time; at 16 and 64 rows the two take about as long (README). 4-bit weights with
``int8_activations`` take another kernel (csrc: x rounded to int8 in blocks of 32 inputs,
products summed in integers with VPMADDUBSW, scaled per block in fp32).

The library is compiled at first use with the system C++ compiler (``$CXX``, else g++, else
c++, else clang++), about 4 s (the runtime starts it on a background thread while the model
loads), for one x86-64 CPU tier (``cpu_isa``): ``avx512`` builds for x86-64-v4 (AVX-512 F, BW,
VL, DQ: 16-lane vector paths), ``avx2`` for x86-64-v3 (AVX2 and FMA: 8-lane vector paths, e.g.
AMD Zen 2/3), ``scalar`` for plain x86-64 (portable loops the compiler vectorizes as it can);
each is tuned for this CPU (``-mtune=native``). The vector paths are one implementation over
either width: decode attention (K/V rows loaded once for a GQA group, vectorized exp),
rms_norm, silu_and_mul, argmax and the GEMM's microkernel. The tier is this CPU's best unless
``KVPAGE_CPU_ISA`` (scalar, avx2, avx512) lowers it; ``library()`` looks it up at each call and
keeps one library per tier, so one process (the tests) can run every tier its CPU has. A tier lowered by
``KVPAGE_CPU_ISA`` is logged once (by ``cpu_isa``), and so is a CPU without AVX2. Libraries are
cached under ``$KVPAGE_CACHE_DIR/kernels`` (default ``~/.cache/kvpage/kernels``), keyed by the
source, the flags, the compiler, the torch version and this CPU's feature flags, so that a
library built on one CPU is never loaded on another that may lack its instructions. On CPUs
other than x86-64 the one tier is scalar, built with ``-march=native``. The library links the
OpenMP runtime torch has already loaded, so it shares torch's threads. Without a compiler the
backend is unavailable and the CPU default stays the torch backend.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from . import cpu_isa, layer_ops, torch_backend
from .errors import KernelBackendUnavailable, KernelInputError
from .packed_weight import QuantizedPanels

copy_blocks = torch_backend.copy_blocks
swap_blocks = torch_backend.swap_blocks

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
# No FMA contraction: the elementwise ops must round where torch's unfused ops round (the
# vector paths call FMA explicitly where the results allow it).
_COMMON_FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
_TIER_FLAGS = {  # the x86-64 level each tier builds for, tuned for this CPU
    "scalar": ("-march=x86-64", "-mtune=native"),
    "avx2": ("-march=x86-64-v3", "-mtune=native"),
    "avx512": ("-march=x86-64-v4", "-mtune=native", "-mprefer-vector-width=512"),
}
_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_i32, _i64, _f32, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_ARGTYPES = [_i32, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr,
             _i32, _i32, _i32, _i32, _i32, _f32, _i32, _f32]
logger = logging.getLogger(__name__)


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def flags(tier: str) -> tuple[str, ...]:
    """The compiler flags of the library for CPU tier `tier` (one of ``cpu_isa.TIERS``)."""
    return (*_COMMON_FLAGS, *(_TIER_FLAGS[tier] if _X86_64 else ("-march=native",)))


def _cache_dir() -> Path:
    root = os.environ.get("KVPAGE_CACHE_DIR") or Path.home() / ".cache" / "kvpage"
    return Path(root) / "kernels"


def library_path(tier: str, compiler: str) -> Path:
    """Where the library for `tier` built by `compiler` is cached: its name changes with the
    source, the flags, the compiler, the torch version and this CPU's feature flags."""
    key = hashlib.sha256("\0".join(
        [SOURCE.read_text(), *flags(tier), compiler, " ".join(sorted(cpu_isa.cpu_flags())),
         torch.__version__]).encode())
    return _cache_dir() / f"cpu_kernels-{tier}-{key.hexdigest()[:16]}.so"


def _build(compiler: str, tier: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags(tier), str(SOURCE), "-o", str(built)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBackendUnavailable(
                f"compiling {SOURCE.name} with {compiler} failed: {result.stderr.strip()[-800:]}")
        os.replace(built, target)  # atomic: a concurrent build of the same key is harmless


_build_lock = threading.Lock()


def library(tier: str | None = None) -> ctypes.CDLL:
    """The compiled kernel library for CPU tier `tier`, by default the tier in use
    (``cpu_isa.cpu_isa()``, read at each call); built on first use, loaded once per tier.
    Raises KernelBackendUnavailable (with the compiler's message) when no compiler is found or
    the build fails, KernelInputError for a tier this CPU does not offer (its code would fail
    with an illegal instruction)."""
    if tier is None:
        return _loaded(cpu_isa.cpu_isa())
    if not cpu_isa.tier_at_least(cpu_isa.detected_isa(), tier):
        raise KernelInputError(f"this CPU offers the {cpu_isa.detected_isa()} tier, not {tier}: "
                               f"the {tier} library would fail with an illegal instruction")
    return _loaded(tier)


@functools.cache
def _loaded(tier: str) -> ctypes.CDLL:
    """The library for `tier`, built if not cached yet; loaded once per tier."""
    compiler = _compiler()
    if compiler is None:
        raise KernelBackendUnavailable(
            "the cpu backend needs a C++ compiler with OpenMP (g++ or clang++; or set $CXX)")
    target = library_path(tier, compiler)
    with _build_lock:  # two threads asking at once build it once
        if not target.is_file():
            _build(compiler, tier, target)
    lib = _declared(ctypes.CDLL(str(target)))
    _log_tier(tier)
    return lib


def _declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    """lib with the argument and result types of its entry points set."""
    lib.kvpage_vector_width.argtypes = []
    lib.kvpage_vector_width.restype = ctypes.c_int
    lib.kvpage_paged_attention.argtypes = _ARGTYPES
    lib.kvpage_paged_attention.restype = ctypes.c_int
    lib.kvpage_write_kv.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64,
                                    _i64, _i64, _i64, _i64]
    lib.kvpage_write_kv.restype = ctypes.c_int64
    lib.kvpage_rotary.argtypes = [_i32, _ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _i64, _i64,
                                  _i64, _i64]
    lib.kvpage_rotary.restype = ctypes.c_int
    lib.kvpage_rms_norm.argtypes = [_i32, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64,
                                    _f32]
    lib.kvpage_rms_norm.restype = ctypes.c_int
    lib.kvpage_argmax.argtypes = [_i32, _ptr, _i64, _ptr, _i64, _i64]
    lib.kvpage_argmax.restype = ctypes.c_int
    lib.kvpage_route_experts.argtypes = [_i32, _ptr, _i64, _i64, _i64, _i64, _i32, _ptr, _ptr]
    lib.kvpage_route_experts.restype = ctypes.c_int
    for name in ("kvpage_silu_and_mul", "kvpage_gelu_tanh_and_mul"):
        getattr(lib, name).argtypes = [_i32, _ptr, _i64, _ptr, _i64, _i64]
        getattr(lib, name).restype = ctypes.c_int
    lib.kvpage_panel_width.argtypes = []
    lib.kvpage_panel_width.restype = ctypes.c_int
    lib.kvpage_packed_linear.argtypes = [_i32, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr]
    lib.kvpage_packed_linear.restype = ctypes.c_int
    lib.kvpage_quantized_linear.argtypes = [ctypes.POINTER(QuantizedMatrix), _ptr, _i64, _i64,
                                            _ptr, _ptr]
    lib.kvpage_quantized_linear.restype = ctypes.c_int
    lib.kvpage_quantized_rows.argtypes = [ctypes.POINTER(QuantizedMatrix), _ptr, _i64, _ptr]
    lib.kvpage_quantized_rows.restype = ctypes.c_int64
    lib.kvpage_quantized_linear_bf16.argtypes = lib.kvpage_quantized_linear.argtypes
    lib.kvpage_quantized_linear_bf16.restype = ctypes.c_int
    lib.kvpage_bf16_dot_rows.argtypes = []
    lib.kvpage_bf16_dot_rows.restype = ctypes.c_int64
    lib.kvpage_lora_shrink.argtypes = [_i32, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64]
    lib.kvpage_lora_shrink.restype = ctypes.c_int64
    lib.kvpage_lora_expand.argtypes = [_i32, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64,
                                       _i64, _i64]
    lib.kvpage_lora_expand.restype = ctypes.c_int64
    return lib


def _log_tier(tier: str) -> None:
    """One line when the scalar path runs because the CPU has nothing better (``cpu_isa``
    logs a tier that KVPAGE_CPU_ISA lowers)."""
    if tier == "scalar" and cpu_isa.detected_isa() == "scalar":
        why = "this CPU has no AVX2 and FMA" if _X86_64 else "the vector paths are x86-64 only"
        logger.info("cpu kernels: the scalar path runs (%s): decode attention takes 2 to 4 "
                    "times as long as with AVX2", why)


def unavailable_reason() -> str | None:
    """Why this backend cannot run here (builds the library if needed), or None."""
    try:
        library()
    except (KernelBackendUnavailable, OSError) as e:
        return str(e)
    return None


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k.device.type != "cpu" or k.stride(-1) != 1 or v.stride(-1) != 1:
        return torch_backend.write_kv(k, v, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.contiguous()
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    bad = library().kvpage_write_kv(
        k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0), v.stride(1),
        k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), slots.shape[0], num_slots,
        k_cache.shape[2], k_cache.shape[3], k.element_size())
    if bad >= 0:
        raise slot_outside_cache(slots, bad, num_slots)
    return None


def slot_outside_cache(slots: torch.Tensor, bad: int, num_slots: int) -> KernelInputError:
    """The error for slot_mapping[bad], which a kernel found past the cache's num_slots."""
    return KernelInputError(f"slot_mapping[{bad}] = {int(slots[bad])} is outside the cache "
                            f"({num_slots} slots = num_blocks x block_size)")


def _attend_in_place(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                     sliding_window, softcap, out) -> None:
    """Attention of every query row, written into out."""
    tables = block_tables.contiguous()
    lens, starts = seq_lens.contiguous(), query_start_loc.contiguous()
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    status = library().kvpage_paged_attention(
        _DTYPE_CODES[q.dtype], q.data_ptr(), q.stride(0), q.stride(1),
        out.data_ptr(), out.stride(0), out.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        tables.data_ptr(), tables.stride(0), lens.data_ptr(), starts.data_ptr(),
        lens.shape[0], num_kv_heads, q.shape[1] // num_kv_heads, head_dim, block_size,
        scale, sliding_window or 0, softcap or 0.0)
    if status != 0:
        raise KernelBackendUnavailable(f"the cpu kernel does not support dtype {q.dtype}")


def _served(q, out, softcap) -> bool:
    return (q.device.type == "cpu" and q.dtype in _DTYPE_CODES and q.stride(-1) == 1
            and out.stride(-1) == 1 and (softcap is None or softcap > 0))


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, *,
                    sliding_window=None, softcap=None, max_seq_len=None, max_query_len=None,
                    out) -> torch.Tensor:
    kwargs = {"sliding_window": sliding_window, "softcap": softcap,
              "max_seq_len": max_seq_len, "max_query_len": max_query_len, "out": out}
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    if seq_lens.shape[0] == 0 or q.shape[0] == 0:
        return out
    if not _served(q, out, softcap):
        return torch_backend.paged_attention(*args, **kwargs)
    _attend_in_place(*args, sliding_window, softcap, out)
    return out


def _rows(*tensors: torch.Tensor | None) -> bool:
    """Non-empty 2-D fp32 or bf16 CPU tensors of one dtype (None allowed) with contiguous rows."""
    present = [t for t in tensors if t is not None]
    return all(t.device.type == "cpu" and t.dtype == present[0].dtype
               and t.dtype in _DTYPE_CODES and t.dim() == 2 and t.shape[0] > 0
               and t.stride(-1) == 1 for t in present)


def rms_norm(x, weight, eps, residual=None):
    if not (_rows(x, residual) and weight.dtype == x.dtype and weight.is_contiguous()):
        return layer_ops.rms_norm(x, weight, eps, residual)
    rows, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=x.dtype)
    total = None if residual is None else torch.empty_like(out)
    library().kvpage_rms_norm(
        _DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0),
        None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0), weight.data_ptr(), out.data_ptr(),
        None if total is None else total.data_ptr(), rows, hidden, eps)
    return out if residual is None else (out, total)


def _gated(name: str):
    """The gated activation ``name`` of layer_ops, one C pass per row where it takes x."""
    def act_and_mul(x):
        if not _rows(x):
            return getattr(layer_ops, name)(x)
        rows, inner = x.shape[0], x.shape[1] // 2
        out = torch.empty(rows, inner, dtype=x.dtype)
        getattr(library(), f"kvpage_{name}")(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0),
                                              out.data_ptr(), rows, inner)
        return out

    act_and_mul.__name__ = name
    return act_and_mul


silu_and_mul = _gated("silu_and_mul")
gelu_tanh_and_mul = _gated("gelu_tanh_and_mul")


def rotary_embedding(x, cos, sin):
    tokens, heads, head_dim = x.shape
    half = cos.shape[-1]
    cos, sin = cos.reshape(tokens, half), sin.reshape(tokens, half)
    if not (x.device.type == "cpu" and x.dtype in _DTYPE_CODES and cos.dtype == x.dtype
            and sin.dtype == x.dtype and x.stride(-1) == 1 and cos.stride(-1) == 1
            and sin.stride(-1) == 1 and cos.stride(0) == sin.stride(0) and tokens > 0):
        return layer_ops.rotary_embedding(x, cos, sin)
    out = torch.empty(tokens, heads, head_dim, dtype=x.dtype)
    library().kvpage_rotary(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), x.stride(1),
                            cos.data_ptr(), sin.data_ptr(), cos.stride(0), out.data_ptr(),
                            tokens, heads, head_dim, half)
    return out


class QuantizedMatrix(ctypes.Structure):
    """``QuantizedPanels`` as the C side reads them (csrc/cpu_kernels.cpp's QuantizedMatrix)."""

    _fields_ = [("codes", _ptr), ("scales", _ptr), ("offsets", _ptr), ("input_order", _ptr),
                ("out_features", _i64), ("in_features", _i64), ("group_size", _i64),
                ("bits", _i32), ("int8_activations", _i32), ("half_groups", _i32)]


def quantized_matrix(packed: QuantizedPanels) -> QuantizedMatrix:
    """The C description of ``packed``, whose tensors must outlive its use."""
    order = packed.input_order
    return QuantizedMatrix(packed.codes.data_ptr(), packed.scales.data_ptr(),
                           packed.offsets.data_ptr(), None if order is None else order.data_ptr(),
                           packed.out_features, packed.in_features, packed.group_size,
                           packed.bits, int(packed.int8_activations),
                           int(packed.scales.dtype == torch.float16))


def bf16_dot_rows() -> int | None:
    """The rows from which the low-bit GEMM multiplies bf16 inputs with AVX512-BF16 dot
    products (the avx512 tier's library on a CPU that has them; the tier in use, read at each
    call), or None where it never does. Below, or without them, it widens the inputs to fp32
    and rounds the weights to bf16 in registers, which is slower than the fp32 GEMM on its
    own weights (the weights' dequantization is what a few rows wait for)."""
    try:
        return library().kvpage_bf16_dot_rows() or None
    except (KernelBackendUnavailable, OSError):
        return None


def packed_linear(x, packed, bias=None):
    if isinstance(packed, QuantizedPanels) and x.device.type == "cpu":
        if packed.int8_activations:
            x = x.float()  # exactly: the activations are then rounded to int8
        elif x.dtype == torch.bfloat16 and x.stride(-1) == 1:
            return _quantized_linear_bf16(x, packed, bias)
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return layer_ops.packed_linear(x, packed, bias)
    rows = x.shape[0]
    out = torch.empty(rows, packed.out_features)
    if rows == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    bias = None if bias is None else bias.contiguous()
    bias_ptr = None if bias is None else bias.data_ptr()
    if isinstance(packed, QuantizedPanels):
        library().kvpage_quantized_linear(ctypes.byref(quantized_matrix(packed)), x.data_ptr(),
                                          x.stride(0), rows, bias_ptr, out.data_ptr())
    else:
        library().kvpage_packed_linear(
            _DTYPE_CODES[packed.dtype], x.data_ptr(), x.stride(0), rows, packed.in_features,
            packed.panels.data_ptr(), packed.out_features, bias_ptr, out.data_ptr())
    return out


def embedding_rows(packed, ids):
    if not (isinstance(packed, QuantizedPanels) and packed.device.type == "cpu"):
        return layer_ops.embedding_rows(packed, ids)
    ids = ids.contiguous()
    out = torch.empty(ids.shape[0], packed.in_features)
    bad = library().kvpage_quantized_rows(ctypes.byref(quantized_matrix(packed)), ids.data_ptr(),
                                          ids.shape[0], out.data_ptr())
    if bad >= 0:
        raise layer_ops.ids_outside_table(ids, packed.out_features)
    return out


def _quantized_linear_bf16(x, packed, bias):
    """packed_linear on bf16 x: the weights rounded to bf16, the products summed in fp32."""
    rows = x.shape[0]
    out = torch.empty(rows, packed.out_features)
    if rows:
        library().kvpage_quantized_linear_bf16(
            ctypes.byref(quantized_matrix(packed)), x.data_ptr(), x.stride(0), rows,
            None if bias is None else bias.contiguous().data_ptr(), out.data_ptr())
    return out


def argmax(x):
    if not (_rows(x) and x.shape[1] > 0):
        return layer_ops.argmax(x)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library().kvpage_argmax(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), out.data_ptr(),
                            x.shape[0], x.shape[1])
    return out


def route_experts(logits, top_k, normalize):
    if not _rows(logits):
        return layer_ops.route_experts(logits, top_k, normalize)
    rows = logits.shape[0]
    weights = torch.empty(rows, top_k, dtype=torch.float32)
    experts = torch.empty(rows, top_k, dtype=torch.int64)
    library().kvpage_route_experts(_DTYPE_CODES[logits.dtype], logits.data_ptr(),
                                   logits.stride(0), rows, logits.shape[1], top_k, normalize,
                                   weights.data_ptr(), experts.data_ptr())
    return weights, experts


def _slot_outside(slots: torch.Tensor, bad: int, num_slots: int) -> KernelInputError:
    """The error for token_slots[bad], which a kernel found outside [-1, num_slots)."""
    return KernelInputError(f"token_slots[{bad}] = {int(slots[bad])} lies outside [-1, "
                            f"{num_slots}) (-1: no adapter; num_slots of the weights)")


def _lora_served(data: torch.Tensor, weights: torch.Tensor, token_slots: torch.Tensor) -> bool:
    return (data.device.type == "cpu" and data.dtype in _DTYPE_CODES
            and weights.dtype == data.dtype and token_slots.dtype == torch.int32)


def lora_shrink(x, lora_a, token_slots):
    if not _lora_served(x, lora_a, token_slots):
        return layer_ops.lora_shrink(x, lora_a, token_slots)
    (rows, depth), (num_slots, rank) = x.shape, lora_a.shape[:2]
    x = x if x.stride(-1) == 1 else x.contiguous()
    lora_a, slots = lora_a.contiguous(), token_slots.contiguous()
    h = torch.empty(rows, rank, dtype=torch.float32)
    bad = library().kvpage_lora_shrink(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0),
                                       lora_a.data_ptr(), slots.data_ptr(), h.data_ptr(), rows,
                                       num_slots, rank, depth)
    if bad >= 0:
        raise _slot_outside(slots, bad, num_slots)
    return h


def lora_expand(out, h, lora_b, token_slots) -> None:
    rows, n = out.shape
    in_place = out.stride(-1) == 1 and (rows <= 1 or out.stride(0) >= n)  # rows apart
    if not (_lora_served(out, lora_b, token_slots) and in_place and h.dtype == torch.float32):
        return layer_ops.lora_expand(out, h, lora_b, token_slots)
    num_slots, rank = lora_b.shape[0], h.shape[1]
    h = h if h.stride(-1) == 1 else h.contiguous()  # a shard's ranks of a wider h: read in place
    lora_b, slots = lora_b.contiguous(), token_slots.contiguous()
    bad = library().kvpage_lora_expand(_DTYPE_CODES[out.dtype], out.data_ptr(), out.stride(0),
                                       h.data_ptr(), h.stride(0), lora_b.data_ptr(),
                                       slots.data_ptr(), rows, num_slots, n, rank)
    if bad >= 0:
        raise _slot_outside(slots, bad, num_slots)
    return None
