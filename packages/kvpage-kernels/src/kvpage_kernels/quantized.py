"""kvpage's one low-bit weight format, into which AWQ, GPTQ and GGUF blocks convert at load.

A weight of ``out_features`` x ``in_features`` is stored as unsigned integer codes ``q`` of
``bits`` bits (4 or 8) in groups of ``group_size`` consecutive inputs; each (output row,
group) has a scale ``s`` and an offset ``m``, and

    w[n, k] = q[n, k] * s[n, k // group_size] + m[n, k // group_size]

That one form holds the formats met in checkpoints, each exactly (in fp32 every product below
is exact, so the dequantized weights equal the reference implementations' bit for bit):

- zero-point formats, AWQ and GPTQ: ``w = (q - z) * s``, so ``m = -z * s``;
- symmetric GGUF blocks: Q4_0 ``w = (q - 8) * d`` (``s = d``, ``m = -8 d``) and Q8_0
  ``w = q' * d`` with signed ``q'``, stored as ``q = q' + 128`` (``m = -128 d``);
- GGUF blocks with a minimum, Q4_1: ``w = q * d + m``.

GPTQ's act-order checkpoints group the inputs in another order than their natural one; they
are converted by permuting the inputs so that groups are contiguous again, and the layer then
multiplies ``x[:, input_order]`` (``input_order`` is None for every other checkpoint).

The codes are one byte each here, the plain form that loaders produce and the reference
dequantizes; a kernel backend packs them (two codes per byte for 4 bits, in the layout its
GEMM reads) once, after loading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import KernelInputError

BITS = (4, 8)
ACTIVATION_BLOCK = 32  # inputs per int8 scale of int8_rounded (csrc's kActBlock)


@dataclass(frozen=True)
class QuantizedWeight:
    codes: torch.Tensor  # uint8 [out_features, in_features], each < 2**bits
    scales: torch.Tensor  # fp32 [out_features, num_groups]
    offsets: torch.Tensor  # fp32 [out_features, num_groups]
    bits: int
    group_size: int
    input_order: torch.Tensor | None = None  # int64 [in_features]: the inputs' order, or None

    def __post_init__(self) -> None:
        check_quantized(self)

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def narrow(self, dim: int, start: int, length: int) -> QuantizedWeight:
        """Outputs (``dim`` 0) or inputs (``dim`` 1) ``start:start + length``, as
        ``torch.Tensor.narrow``: a tensor-parallel rank's slice. Inputs are cut at group
        boundaries only, and not where the inputs are reordered (act-order)."""
        if dim == 0:
            return QuantizedWeight(self.codes.narrow(0, start, length),
                                   self.scales.narrow(0, start, length),
                                   self.offsets.narrow(0, start, length), self.bits,
                                   self.group_size, self.input_order)
        if self.input_order is not None:
            raise KernelInputError("a weight whose inputs are reordered (act-order) cannot be "
                                   "split along its inputs")
        if start % self.group_size or length % self.group_size:
            raise KernelInputError(
                f"inputs {start}:{start + length} do not fall on groups of {self.group_size}")
        groups = slice(start // self.group_size, (start + length) // self.group_size)
        return QuantizedWeight(self.codes.narrow(1, start, length), self.scales[:, groups],
                               self.offsets[:, groups], self.bits, self.group_size)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out_features, in_features], in the inputs' natural order."""
        expand = lambda t: t.repeat_interleave(self.group_size, dim=1)  # noqa: E731
        weight = self.codes.float() * expand(self.scales) + expand(self.offsets)
        if self.input_order is None:
            return weight
        natural = torch.empty_like(weight)
        natural[:, self.input_order] = weight
        return natural

    @staticmethod
    def stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """The weights of several projections of one input, stacked along their outputs (the
        fused q/k/v or gate/up layers); they must agree in bits, group size and input order."""
        first = parts[0]
        for part in parts[1:]:
            if (part.bits, part.group_size, part.in_features) != (
                    first.bits, first.group_size, first.in_features):
                raise KernelInputError(
                    f"cannot stack quantized weights of {part.bits} bits, group {part.group_size}, "
                    f"{part.in_features} inputs onto {first.bits} bits, group {first.group_size}, "
                    f"{first.in_features} inputs")
            if not _same_order(part.input_order, first.input_order):
                raise KernelInputError("cannot stack quantized weights whose inputs are ordered "
                                       "differently (GPTQ act-order with different g_idx)")
        return QuantizedWeight(
            torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
            torch.cat([p.offsets for p in parts]), first.bits, first.group_size,
            first.input_order)


def int8_rounded(x: torch.Tensor, group_size: int,
                 input_order: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in_features] in fp32 as a GEMM with int8 activations multiplies it (the
    ``int8_activations`` of ``QuantizedPanels``, as llama.cpp's Q8 blocks): each row in blocks
    of ``ACTIVATION_BLOCK`` consecutive inputs (in ``input_order``) within each group of
    ``group_size`` (the last block of a group shorter where the group is not a multiple of it),
    each value rounded to a multiple of its block's step ``d = max|x| / 127``:
    ``round(x * (127 / max|x|)) * d``, to the nearest integer with ties to even (zeros for a
    block of zeros; a NaN turns its block into NaNs)."""
    x = x.float()
    ordered = x if input_order is None else x[:, input_order]
    rows, depth = ordered.shape
    groups, per_group = depth // group_size, -(-group_size // ACTIVATION_BLOCK)
    padded = ordered.new_zeros(rows, groups, per_group * ACTIVATION_BLOCK)
    padded[:, :, :group_size] = ordered.view(rows, groups, group_size)
    blocks = padded.view(rows, groups, per_group, ACTIVATION_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    usable = (amax > 0) & torch.isfinite(amax)
    # 127 / max|x| divided as the kernels divide (torch computes ``127.0 / t`` as 127 * (1 / t))
    inverse = torch.where(usable, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    levels = torch.nan_to_num(blocks * inverse, nan=0.0).round()
    step = amax.div(torch.full_like(amax, 127.0))
    rounded = (levels * step).view(rows, groups, per_group * ACTIVATION_BLOCK)
    rounded = rounded[:, :, :group_size].reshape(rows, depth)
    if input_order is None:
        return rounded
    natural = torch.empty_like(rounded)
    natural[:, input_order] = rounded
    return natural


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def check_quantized(w: QuantizedWeight) -> None:
    """Raises KernelInputError naming the first field that breaks the format."""
    if w.bits not in BITS:
        raise KernelInputError(f"bits must be one of {BITS}, got {w.bits}")
    if w.codes.dtype != torch.uint8 or w.codes.dim() != 2:
        raise KernelInputError(f"codes must be a 2-D uint8 tensor, got {w.codes.dtype} "
                               f"{tuple(w.codes.shape)}")
    out_features, in_features = w.codes.shape
    if w.group_size < 1 or in_features % w.group_size:
        raise KernelInputError(f"group_size {w.group_size} must divide in_features {in_features}")
    groups = (out_features, in_features // w.group_size)
    for name in ("scales", "offsets"):
        t = getattr(w, name)
        if t.dtype != torch.float32 or tuple(t.shape) != groups:
            raise KernelInputError(f"{name} must be fp32 of shape {groups}, got {t.dtype} "
                                   f"{tuple(t.shape)}")
    if w.input_order is not None and (w.input_order.dtype != torch.int64
                                      or tuple(w.input_order.shape) != (in_features,)):
        raise KernelInputError(f"input_order must be int64 of shape ({in_features},), got "
                               f"{w.input_order.dtype} {tuple(w.input_order.shape)}")
