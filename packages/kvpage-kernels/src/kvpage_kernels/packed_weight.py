"""The packed weights that ``packed_linear`` multiplies by: a linear layer's weight in panels.

A weight W [out_features, in_features] is laid out in panels of PANEL_WIDTH output columns,
each holding the PANEL_WIDTH weights of one input side by side, so that the cpu backend's
GEMM reads one panel for every row of a batch as one contiguous stream; the layout is the
same on every CPU tier. Columns past out_features are zeros. Two kinds:

- ``PackedWeight``, fp32 or bf16: ``panels[p, i, j] = W[p * PANEL_WIDTH + j, i]``, 64 bytes
  (fp32) per input and panel.
- ``QuantizedPanels``, a ``QuantizedWeight`` (``quantized.py``: codes of 4 or 8 bits, a scale
  and an offset per group of inputs) packed as it stays in memory. The codes of one column for
  ``32 // bits`` consecutive inputs share a 32-bit word, the first input in the lowest bits:
  ``codes[p, k // per_word, j]`` holds ``q[p * PANEL_WIDTH + j, k]`` at bit ``bits * (k %
  per_word)``, so that a panel is [in_features / per_word][PANEL_WIDTH] words (8 bytes of codes
  per input in 4 bits, 16 in 8 bits) and a vector of words yields the codes of one input for
  PANEL_WIDTH columns with a shift and a mask. Scales and offsets are laid out per panel and
  group, ``scales[p, g, j]`` for column ``p * PANEL_WIDTH + j`` and group ``g``, beside them,
  in fp16 where every scale and offset is exact in it (fp16 checkpoint scales, GGUF's blocks,
  zero points that fit): 4 bytes per group and column to read instead of 8, which a decode
  step of one sequence waits for; else in fp32.
  Groups hold a whole number of words (a multiple of 8 inputs in 4 bits, of 4 in 8 bits).
  GPTQ's ``input_order`` stays as it is: the GEMM reads the inputs of x in that order.

``unpack`` gives the weight back exactly (a ``QuantizedWeight`` for ``QuantizedPanels``);
``dense_weight`` is the fp32 W in the inputs' natural order, which the reference and torch
backends multiply by; ``dense_rows`` dequantizes some rows only (an embedding lookup in a
weight that also serves as a tied LM head).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .errors import KernelInputError
from .quantized import QuantizedWeight

PANEL_WIDTH = 16  # the cpu backend's kPanelWidth (csrc/cpu_kernels.cpp)
DTYPES = (torch.float32, torch.bfloat16)


def _num_panels(out_features: int) -> int:
    return -(-out_features // PANEL_WIDTH)


def _padded(t: torch.Tensor) -> torch.Tensor:
    """t [out_features, ...] with zero rows appended up to a whole number of panels."""
    padded = t.new_zeros(_num_panels(t.shape[0]) * PANEL_WIDTH, *t.shape[1:])
    padded[:t.shape[0]] = t
    return padded


def _panel_and_column(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.div(ids, PANEL_WIDTH, rounding_mode="floor"), ids % PANEL_WIDTH


@dataclass(frozen=True)
class PackedWeight:
    """W [out_features, in_features] as panels [ceil(out_features / PANEL_WIDTH),
    in_features, PANEL_WIDTH], fp32 or bf16 (bf16 is widened to fp32 as it is multiplied)."""

    panels: torch.Tensor
    out_features: int
    in_features: int

    @property
    def dtype(self) -> torch.dtype:
        return self.panels.dtype

    @property
    def device(self) -> torch.device:
        return self.panels.device

    @property
    def nbytes(self) -> int:
        """The bytes it holds in memory."""
        return self.panels.nbytes

    @property
    def expected_shape(self) -> tuple[int, int, int]:
        """The shape of ``panels`` for these features."""
        return (_num_panels(self.out_features), self.in_features, PANEL_WIDTH)

    def unpack(self) -> torch.Tensor:
        """W [out_features, in_features] (a new tensor)."""
        return self.panels.transpose(1, 2).reshape(-1, self.in_features)[:self.out_features]

    def dense_weight(self) -> torch.Tensor:
        """W in fp32."""
        return self.unpack().float()

    def dense_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (int64 [n]) of W in fp32: [n, in_features]."""
        panel, column = _panel_and_column(ids)
        return self.panels[panel, :, column].float()


@dataclass(frozen=True)
class QuantizedPanels:
    """A ``QuantizedWeight`` of ``out_features`` x ``in_features`` in panels (module
    docstring): codes int32 [num_panels, in_features // codes_per_word, PANEL_WIDTH], scales
    and offsets fp16 or fp32 (both the same) [num_panels, in_features // group_size,
    PANEL_WIDTH], ``w = q * scale + offset`` in fp32; ``input_order`` (int64 [in_features] or
    None) as in the ``QuantizedWeight``. ``int8_activations``: ``packed_linear`` rounds x to
    int8 as it multiplies by these weights (``quantized.int8_rounded``; set by
    ``with_int8_activations``)."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    bits: int
    group_size: int
    input_order: torch.Tensor | None
    out_features: int
    in_features: int
    int8_activations: bool = False

    @property
    def codes_per_word(self) -> int:
        return codes_per_word(self.bits)

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """The bytes it holds in memory (codes, scales, offsets and input order)."""
        order = 0 if self.input_order is None else self.input_order.nbytes
        return self.codes.nbytes + self.scales.nbytes + self.offsets.nbytes + order

    @property
    def expected_shapes(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """The shapes of ``codes`` and of ``scales`` (and ``offsets``) for these features."""
        panels = _num_panels(self.out_features)
        return ((panels, self.in_features // self.codes_per_word, PANEL_WIDTH),
                (panels, self.num_groups, PANEL_WIDTH))

    def with_int8_activations(self, enabled: bool = True) -> QuantizedPanels:
        """The same weights (the tensors shared), multiplied with int8 activations or not;
        4-bit weights only (8-bit ones measured no faster that way)."""
        if enabled and self.bits != 4:
            raise KernelInputError(f"int8 activations multiply 4-bit weights only, these have "
                                   f"{self.bits} bits")
        return dataclasses.replace(self, int8_activations=enabled)

    def unpack(self) -> QuantizedWeight:
        """The ``QuantizedWeight`` that was packed (new tensors, equal to its own)."""
        return self._rows(torch.arange(self.out_features, device=self.device))

    def dense_weight(self) -> torch.Tensor:
        """The fp32 weight [out_features, in_features], in the inputs' natural order."""
        return self.unpack().dequantize()

    def dense_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (int64 [n]) of the fp32 weight, in the inputs' natural order:
        [n, in_features], as ``QuantizedWeight.dequantize`` computes them."""
        return self._rows(ids).dequantize()

    def _rows(self, ids: torch.Tensor) -> QuantizedWeight:
        panel, column = _panel_and_column(ids)
        words = self.codes[panel, :, column].long() & 0xFFFFFFFF  # [n, words]
        shifts = torch.arange(0, 32, self.bits, device=self.device)
        codes = (words.unsqueeze(-1) >> shifts) & ((1 << self.bits) - 1)
        return QuantizedWeight(codes.reshape(ids.shape[0], self.in_features).to(torch.uint8),
                               self.scales[panel, :, column].float(),
                               self.offsets[panel, :, column].float(),
                               self.bits, self.group_size, self.input_order)


def codes_per_word(bits: int) -> int:
    """Codes of ``bits`` bits in one 32-bit word of ``QuantizedPanels.codes``."""
    return 32 // bits


def pack(weight: torch.Tensor) -> PackedWeight:
    """``weight`` [out_features, in_features] in panels (on its device, in its dtype)."""
    out_features, in_features = weight.shape
    panels = _padded(weight).view(-1, PANEL_WIDTH, in_features).transpose(1, 2).contiguous()
    return PackedWeight(panels, out_features, in_features)


def pack_quantized(weight: QuantizedWeight) -> QuantizedPanels:
    """``weight`` in panels (on its device); its group size must hold whole words."""
    per_word = codes_per_word(weight.bits)
    codes = _padded(weight.codes).long().view(-1, PANEL_WIDTH, weight.in_features // per_word,
                                              per_word)
    shifts = torch.arange(0, 32, weight.bits, device=codes.device)
    words = (codes << shifts).sum(dim=-1)  # < 2**32: the int32 of the same bits below
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    def per_panel(t: torch.Tensor) -> torch.Tensor:  # [rows, n] -> [panels, n, PANEL_WIDTH]
        return _padded(t).view(-1, PANEL_WIDTH, t.shape[1]).transpose(1, 2).contiguous()

    order = None if weight.input_order is None else weight.input_order.contiguous()
    scales, offsets = _narrowest(weight.scales, weight.offsets)
    return QuantizedPanels(words.transpose(1, 2).contiguous(), per_panel(scales),
                           per_panel(offsets), weight.bits, weight.group_size, order,
                           weight.out_features, weight.in_features)


def _narrowest(scales: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scales and offsets (fp32) in fp16 if every value is exact in it (NaN never is), else
    as they are."""
    halves = scales.half(), offsets.half()
    exact = all(torch.equal(h.float(), t) for h, t in zip(halves, (scales, offsets), strict=True))
    return halves if exact else (scales, offsets)
