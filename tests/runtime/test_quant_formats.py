"""AWQ, GPTQ and GGUF block tensors convert into kvpage's low-bit format exactly: the
dequantized weight equals the reference implementations' dequantization bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from kvpage_runtime.layers.quantization.formats import (
    QuantizationFormatError,
    awq_weight,
    gguf_weight,
    gptq_weight,
)
from quant_helpers import AWQ_ORDER, pack_along


def _random_quantization(out_f: int, in_f: int, bits: int, group: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen)
    zeros = torch.randint(0, 1 << bits, (out_f, in_f // group), generator=gen)
    scales = (torch.rand(out_f, in_f // group, generator=gen) * 0.1 + 0.01).half()
    return codes, zeros, scales


@pytest.mark.parametrize("group", [32, 64, 128])
def test_awq_matches_its_reference_dequantization(group):
    out_f, in_f = 48, 256
    codes, zeros, scales = _random_quantization(out_f, in_f, 4, group, seed=group)
    # AutoAWQ's gemm layout: [in, out/8] words along the outputs, interleaved
    qweight = pack_along(codes.t(), 4, dim=1, order=AWQ_ORDER)
    qzeros = pack_along(zeros.t(), 4, dim=1, order=AWQ_ORDER)
    w = awq_weight(qweight, qzeros, scales.t().contiguous(), group)
    expected = ((codes - zeros.repeat_interleave(group, 1)).float()
                * scales.float().repeat_interleave(group, 1))
    assert torch.equal(w.dequantize(), expected)
    assert w.bits == 4 and w.group_size == group and w.input_order is None


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [-1, 32, 128])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_matches_its_reference_dequantization(bits, group, act_order, checkpoint_format):
    out_f, in_f = 64, 256
    size = in_f if group == -1 else group
    codes, zeros, scales = _random_quantization(out_f, in_f, bits, size, seed=bits + size)
    if checkpoint_format == "gptq":
        zeros = zeros.clamp(min=1)  # stored minus one
    g_idx = torch.arange(in_f) // size
    if act_order:  # GPTQ quantizes inputs in a permuted order: groups follow that order
        perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(5))
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = torch.arange(in_f) // size
    stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
    qweight = pack_along(codes.t(), bits, dim=0)  # [in*bits/32, out] along the inputs
    qzeros = pack_along(stored_zeros.t(), bits, dim=1)  # [groups, out*bits/32]
    w = gptq_weight(qweight, qzeros, scales.t().contiguous(), g_idx.int(), bits, group,
                    checkpoint_format)
    # AutoGPTQ: w[:, k] = scales[g_idx[k]] * (q[:, k] - zeros[g_idx[k]])
    expected = (codes - zeros[:, g_idx]).float() * scales.float()[:, g_idx]
    assert torch.equal(w.dequantize(), expected)
    assert (w.input_order is not None) == (act_order and group != -1)  # one group: no order


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_match_the_gguf_package(qtype):
    out_f, in_f = 24, 96
    kind = gguf.GGMLQuantizationType[qtype]
    block_bytes = gguf.GGML_QUANT_SIZES[kind][1]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (out_f, in_f // 32 * block_bytes), dtype=np.uint8)
    halves = 2 if qtype == "Q4_1" else 1  # d (and m) per block: finite fp16 values
    blocks = raw.reshape(out_f, -1, block_bytes)
    values = rng.uniform(-0.05, 0.05, (out_f, blocks.shape[1], halves)).astype(np.float16)
    blocks[:, :, : 2 * halves] = values.view(np.uint8).reshape(out_f, -1, 2 * halves)
    w = gguf_weight(raw, qtype, (out_f, in_f))
    expected = gguf.quants.dequantize(raw, kind).reshape(out_f, in_f)
    assert torch.equal(w.dequantize(), torch.from_numpy(expected))


def test_malformed_tensors_are_named():
    codes, zeros, scales = _random_quantization(16, 64, 4, 32, seed=0)
    qweight = pack_along(codes.t(), 4, dim=1, order=AWQ_ORDER)
    qzeros = pack_along(zeros.t(), 4, dim=1, order=AWQ_ORDER)
    with pytest.raises(QuantizationFormatError, match="qzeros"):
        awq_weight(qweight, qzeros[:1], scales.t().contiguous(), 32)
    with pytest.raises(QuantizationFormatError, match="3 bits"):
        gptq_weight(qweight, qzeros, scales.t(), None, 3, 32)
    with pytest.raises(QuantizationFormatError, match="Q5_K"):
        gguf_weight(np.zeros(10, np.uint8), "Q5_K", (1, 32))
    with pytest.raises(QuantizationFormatError, match="needs 36 bytes"):
        gguf_weight(np.zeros(10, np.uint8), "Q4_0", (2, 32))
