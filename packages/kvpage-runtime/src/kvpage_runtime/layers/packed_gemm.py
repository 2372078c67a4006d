"""Dense weights repacked once, after loading, into the layout the CPU's GEMM reads best.

On the CPU, ``F.linear`` multiplies by a plain row-major weight and every call re-packs its
tiles on the fly. Packing them ahead of time is what makes small-batch (decode) GEMMs fast.

What each dtype gets (``choose_packing``; ``pack_model_weights`` logs it once per dtype):

- fp32: kvpage-kernels' own GEMM (``pack_weight`` / ``packed_linear``, weights in panels of 16
  outputs, a register-tiled kernel for each CPU tier) wherever its ``cpu`` backend runs (a C++
  compiler is found). On the AMD EPYC (Zen 4) it was measured on, for SmolLM2-135M's decode
  step with weights streamed from memory, it took 0.37x the time of MKL's packed sgemm at 16
  rows and 0.61x at 64 (0.43x and 0.60x limited to AVX2), and as long as oneDNN's or less at
  every batch size. Without the backend: MKL's packed sgemm (``torch.ops.mkl._mkl_linear``)
  where torch has MKL (the pack is larger than the weight: 1.3x for 4096x4096 matrices, up
  to 9x for small ones).
- bf16 / fp16: oneDNN's blocked weight format (``torch.ops.mkldnn._linear_pointwise``), only
  where oneDNN computes that dtype on this CPU (bf16: AVX-512 BW/VL/DQ or AVX-NE-CONVERT;
  fp16: AVX-512-FP16 or AVX-NE-CONVERT) and kvpage's CPU tier (``kvpage_kernels.cpu_isa``) is
  ``avx512``. Elsewhere, an AVX2-only CPU such as AMD Zen 3 or any CPU under
  ``KVPAGE_CPU_ISA=avx2``, they are multiplied by plain ``F.linear``, which computes them
  everywhere, only more slowly.

Packs are plain attributes, not parameters: they never enter a state dict, and they are made
last, once the weights are in their final dtype and place. Set ``KVPAGE_CPU_WEIGHT_PACKING=0``
to multiply by the plain weights instead. The fp32 fused decoder stack
(``models.fused_decode``) multiplies by the packs, so that switch also sends fp32 decode steps
through the layer modules (logged when the stack is built).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kvpage_kernels import PackedWeight, pack_weight, packed_linear, select_backend
from kvpage_kernels.cpu_isa import cpu_isa, tier_at_least
from torch import nn

ENV_VAR = "KVPAGE_CPU_WEIGHT_PACKING"
# The row count the packs are tuned for (a decode batch); any row count is accepted.
BATCH_HINT = 64
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# dtype -> (what oneDNN's GEMM needs of the CPU for it, torch's check that this CPU has it)
_ONEDNN_NEEDS = {
    torch.bfloat16: ("AVX-512 BW/VL/DQ or AVX-NE-CONVERT", "_is_mkldnn_bf16_supported"),
    torch.float16: ("AVX-512-FP16 or AVX-NE-CONVERT", "_is_mkldnn_fp16_supported"),
}
logger = logging.getLogger(__name__)

PackedLinear = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class Packing:
    """How the weights of one dtype are multiplied on this CPU, and why."""

    dtype: torch.dtype
    library: str | None  # "panels" (kvpage's GEMM), "mkl", "onednn", or None for F.linear
    why: str

    def __str__(self) -> str:
        name = DTYPE_NAMES.get(self.dtype, str(self.dtype))
        if self.library is None:
            return f"{name} weights are not packed: {self.why}; using F.linear"
        return f"{name} weights are packed for {self.why}"


def choose_packing(dtype: torch.dtype) -> Packing:
    """The packing this CPU, this torch build and the switches allow for ``dtype``."""
    if os.environ.get(ENV_VAR) == "0":
        return Packing(dtype, None, f"{ENV_VAR}=0")
    if dtype == torch.float32:
        if select_backend("cpu") == "cpu":
            return Packing(dtype, "panels", "kvpage's own GEMM (the cpu kernel backend)")
        if _mkl_available():
            return Packing(dtype, "mkl", "MKL's packed sgemm (no cpu kernel backend)")
        return Packing(dtype, None, "no cpu kernel backend and no MKL in this torch build")
    if dtype not in _ONEDNN_NEEDS:
        return Packing(dtype, None, "no packed GEMM takes this dtype")
    if not _onednn_available():
        return Packing(dtype, None, "this torch build has no oneDNN linear")
    needs, supported = _ONEDNN_NEEDS[dtype]
    tier = cpu_isa()
    if not (tier_at_least(tier, "avx512") and getattr(torch.ops.mkldnn, supported)()):
        name = DTYPE_NAMES[dtype]
        return Packing(dtype, None, f"oneDNN's {name} GEMM needs {needs} (CPU tier in use: {tier})")
    return Packing(dtype, "onednn", "oneDNN's GEMM (its blocked layout)")


def _mkl_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PanelLinear:
    """``x @ weight.T + bias`` by kvpage-kernels' GEMM; ``packed`` is the weight in panels
    (which the fused decoder stack multiplies by too)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.packed: PackedWeight = pack_weight(weight)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = packed_linear(rows, self.packed, bias)
        return out.view(*x.shape[:-1], out.shape[-1])


class MklPackedLinear:
    """``x @ weight.T + bias`` by MKL's packed sgemm; ``mkl_weight`` is the pack (which
    kvpage_kernels' fused decoder multiplies by too)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.mkl_weight = torch.ops.mkl._mkl_reorder_linear_weight(weight, BATCH_HINT)

    @property
    def nbytes(self) -> int:
        return self.mkl_weight.nbytes

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows == 0:
            return F.linear(x, self.weight, bias)
        return torch.ops.mkl._mkl_linear(x, self.mkl_weight, self.weight, bias, rows)


def onednn_rows(rows: int) -> int:
    """The row count oneDNN is called with for ``rows`` rows.

    oneDNN compiles a kernel for every row count it meets and keeps up to 1,024 of them for the
    life of the process, about half a megabyte each in bf16: a server, whose steps carry every
    token count, grew by hundreds of megabytes that way. Rows are therefore padded to one of a
    few sizes: every count up to 32 (decode batches), then four per doubling (56 sizes below
    2,048), which costs at most a quarter more rows.
    """
    if rows <= 32:
        return rows
    step = 1 << (rows.bit_length() - 3)
    return -(-rows // step) * step


def _onednn_packed(weight: torch.Tensor) -> PackedLinear:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)

    def linear(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.numel() == 0:
            return F.linear(x, weight, bias)
        rows = x.shape[0]
        padded = onednn_rows(rows)
        if padded == rows:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        x = F.pad(x, (0, 0, 0, padded - rows))
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")[:rows]

    return linear


def pack_linear_weight(weight: torch.Tensor) -> PackedLinear | None:
    """A packed ``x @ weight.T + bias`` for this CPU, or None where plain ``F.linear`` is used."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return None
    library = choose_packing(weight.dtype).library
    if library == "panels":
        return PanelLinear(weight.detach())
    if library == "mkl":
        return MklPackedLinear(weight.detach())
    if library == "onednn":
        return _onednn_packed(weight.detach())
    return None


def pack_model_weights(model: nn.Module) -> None:
    """Let every module that can (it has ``pack_weights()``) repack its weights for the device;
    log the packing chosen for each dtype of CPU weights met."""
    dtypes = set()
    for module in model.modules():
        pack = getattr(module, "pack_weights", None)
        if pack is not None:
            pack()
            weight = getattr(module, "weight", None)
            if weight is not None and weight.device.type == "cpu":
                dtypes.add(weight.dtype)
    for dtype in sorted(dtypes, key=str):
        logger.info("%s", choose_packing(dtype))
