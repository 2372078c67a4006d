"""Checkpoint formats of low-bit weights, converted into kvpage's one (``QuantizedWeight``).

Each converter takes the tensors as the checkpoint stores them and returns the codes, scales
and offsets of ``w = q * scale + offset`` per group of inputs (see
``kvpage_kernels.quantized``); every conversion is exact. A tensor of the wrong shape or type
raises QuantizationFormatError naming it.

- AWQ (AutoAWQ's ``gemm`` version, 4 bits with zero points): ``qweight`` int32
  [in, out / 8] holding eight 4-bit codes per word along the outputs, in the interleaved order
  (0, 2, 4, 6, 1, 3, 5, 7); ``qzeros`` int32 [in / group, out / 8] packed the same way;
  ``scales`` fp16 [in / group, out]; ``w = (q - z) * s``.
- GPTQ (AutoGPTQ, 4 or 8 bits): ``qweight`` int32 [in * bits / 32, out] packed along the
  inputs (input ``i`` of a word at bit ``bits * i``); ``qzeros`` int32
  [groups, out * bits / 32] packed along the outputs, stored minus one in the classic
  ``checkpoint_format: gptq`` (as is in ``gptq_v2``); ``scales`` fp16 [groups, out];
  ``g_idx`` int32 [in], each input's group: with act-order (``desc_act``) the groups are a
  permutation of the inputs, which the conversion undoes into ``input_order``.
- GGUF blocks of 32 weights along the inputs: Q4_0 (fp16 ``d``, 16 bytes of nibbles,
  ``w = (q - 8) d``), Q4_1 (fp16 ``d`` and ``m``, ``w = q d + m``), Q8_0 (fp16 ``d``, 32
  signed bytes, ``w = q d``). In a block's 16 bytes, byte ``j`` holds weight ``j`` in its low
  nibble and weight ``j + 16`` in its high one.
"""

from __future__ import annotations

import numpy as np
import torch
from kvpage_kernels.quantized import QuantizedWeight

from kvpage_runtime.errors import ModelLoadError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output column each nibble of an AWQ word holds
GGUF_BLOCK = 32


class QuantizationFormatError(ModelLoadError):
    """A quantized checkpoint tensor that does not follow its format."""


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtypes) -> None:
    if tuple(tensor.shape) != shape or tensor.dtype not in dtypes:
        raise QuantizationFormatError(
            f"{name}: expected {'/'.join(str(d) for d in dtypes)} of shape {shape}, got "
            f"{tensor.dtype} of shape {tuple(tensor.shape)}")


def _unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The codes of int32 ``words``, each word's codes (low bits first) along ``dim``."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    view = [1] * (words.dim() + 1)
    view[dim + 1] = per_word
    codes = (words.unsqueeze(dim + 1) >> shifts.view(view)) & ((1 << bits) - 1)
    shape = list(words.shape)
    shape[dim] *= per_word
    return codes.reshape(shape)


def _zero_point_weight(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                       bits: int, group_size: int,
                       input_order: torch.Tensor | None = None) -> QuantizedWeight:
    """codes [out, in], zeros and scales [out, groups]: ``w = (q - z) * s``."""
    scales = scales.float()
    return QuantizedWeight(codes.to(torch.uint8).contiguous(), scales.contiguous(),
                           (-zeros.float() * scales).contiguous(), bits, group_size,
                           input_order)


def awq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> QuantizedWeight:
    """An AWQ ``gemm`` layer's tensors (4 bits, zero points)."""
    in_features, out_features = qweight.shape[0], scales.shape[1]
    if group_size < 1 or in_features % group_size or out_features % 8:
        raise QuantizationFormatError(
            f"AWQ layer of {in_features} inputs and {out_features} outputs: inputs must divide "
            f"into groups of {group_size} and outputs into words of 8")
    groups = in_features // group_size
    _expect("qweight", qweight, (in_features, out_features // 8), (torch.int32,))
    _expect("qzeros", qzeros, (groups, out_features // 8), (torch.int32,))
    _expect("scales", scales, (groups, out_features), (torch.float16, torch.float32))
    natural = torch.tensor([AWQ_ORDER.index(c) for c in range(8)])
    reorder = (torch.arange(out_features).view(-1, 8) // 8 * 8 + natural).view(-1)

    def columns(words: torch.Tensor) -> torch.Tensor:
        return _unpack_words(words, 4, dim=1)[:, reorder]

    return _zero_point_weight(columns(qweight).t(), columns(qzeros).t(), scales.t(), 4,
                              group_size)


def gptq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, bits: int, group_size: int,
                checkpoint_format: str = "gptq") -> QuantizedWeight:
    """A GPTQ layer's tensors; ``group_size`` -1 means one group of all inputs."""
    if bits not in (4, 8):
        raise QuantizationFormatError(f"GPTQ with {bits} bits is not supported (4 or 8 are)")
    per_word = 32 // bits
    in_features, out_features = qweight.shape[0] * per_word, scales.shape[1]
    group_size = in_features if group_size == -1 else group_size
    if group_size < 1 or in_features % group_size or out_features % per_word:
        raise QuantizationFormatError(
            f"GPTQ layer of {in_features} inputs and {out_features} outputs: inputs must divide "
            f"into groups of {group_size} and outputs into words of {per_word}")
    groups = in_features // group_size
    _expect("qweight", qweight, (in_features // per_word, out_features), (torch.int32,))
    _expect("qzeros", qzeros, (groups, out_features // per_word), (torch.int32,))
    _expect("scales", scales, (groups, out_features), (torch.float16, torch.float32))
    codes = _unpack_words(qweight, bits, dim=0).t()  # [out, in]
    zeros = _unpack_words(qzeros, bits, dim=1).t()  # [out, groups]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    elif checkpoint_format != "gptq_v2":
        raise QuantizationFormatError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}")
    order = _input_order(g_idx, in_features, group_size)
    if order is not None:
        codes = codes[:, order]
    return _zero_point_weight(codes, zeros, scales.t(), bits, group_size, order)


def _input_order(g_idx: torch.Tensor | None, in_features: int,
                 group_size: int) -> torch.Tensor | None:
    """None when inputs come group after group (k // group_size), else the order that makes
    the groups contiguous (act-order)."""
    if g_idx is None:
        return None
    _expect("g_idx", g_idx, (in_features,), (torch.int32, torch.int64))
    g_idx = g_idx.long()
    if torch.equal(g_idx, torch.arange(in_features) // group_size):
        return None
    order = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[order], torch.arange(in_features) // group_size):
        raise QuantizationFormatError(
            f"g_idx does not give every group {group_size} inputs (act-order groups must)")
    return order


def gguf_weight(blocks: np.ndarray, qtype: str, shape: tuple[int, int]) -> QuantizedWeight:
    """A GGUF tensor of Q4_0, Q4_1 or Q8_0 blocks (raw bytes, one row of blocks per output) as
    a weight of ``shape`` = (out_features, in_features)."""
    out_features, in_features = shape
    layout = _GGUF_LAYOUTS.get(qtype)
    if layout is None:
        raise QuantizationFormatError(f"GGUF type {qtype} is not kept quantized")
    if in_features % GGUF_BLOCK:
        raise QuantizationFormatError(f"{qtype} rows of {in_features} weights are not whole "
                                      f"blocks of {GGUF_BLOCK}")
    block_bytes, bits, read = layout
    raw = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1)
    num_blocks = out_features * in_features // GGUF_BLOCK
    if raw.size != num_blocks * block_bytes:
        raise QuantizationFormatError(
            f"{qtype} tensor of shape {shape} needs {num_blocks * block_bytes} bytes, has "
            f"{raw.size}")
    codes, scales, offsets = read(raw.reshape(num_blocks, block_bytes))
    groups = (out_features, in_features // GGUF_BLOCK)
    return QuantizedWeight(
        torch.from_numpy(codes.reshape(out_features, in_features)),
        torch.from_numpy(scales.reshape(groups)), torch.from_numpy(offsets.reshape(groups)),
        bits, GGUF_BLOCK)


def _halves(block: np.ndarray, start: int) -> np.ndarray:
    """fp16 values at byte ``start`` of each block, as fp32."""
    return block[:, start : start + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 codes: low nibbles are weights 0-15, high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _read_q4_0(b: np.ndarray):
    d = _halves(b, 0)
    return _nibbles(b[:, 2:]), d, -8.0 * d


def _read_q4_1(b: np.ndarray):
    return _nibbles(b[:, 4:]), _halves(b, 0), _halves(b, 2)


def _read_q8_0(b: np.ndarray):
    d = _halves(b, 0)
    signed = b[:, 2:].view(np.int8).astype(np.int16)
    return (signed + 128).astype(np.uint8), d, -128.0 * d


# qtype -> (bytes per block of 32, bits per code, reader of codes, scales, offsets)
_GGUF_LAYOUTS = {
    "Q4_0": (2 + 16, 4, _read_q4_0),
    "Q4_1": (4 + 16, 4, _read_q4_1),
    "Q8_0": (2 + 32, 8, _read_q8_0),
}
