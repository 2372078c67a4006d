"""packed_linear on low-bit weights (``QuantizedPanels`` from ``pack_weight`` of a
``QuantizedWeight``) against the reference (x @ the dequantized weight^T), on every CPU tier
of the cpu backend this CPU offers, on fresh random data each run; packing, unpacking,
embedding_rows and the argument checks."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from kvpage_kernels import (
    KernelInputError,
    QuantizedPanels,
    cpu_backend,
    cpu_isa,
    embedding_rows,
    pack_weight,
    packed_linear,
)
from kvpage_kernels.packed_weight import PANEL_WIDTH

from .cases import (
    assert_close_to_product,
    in_fp32_groups,
    random_low_bit_problem,
    random_quantized,
)

if cpu_backend.unavailable_reason() is not None:
    pytest.skip(f"cpu backend unavailable: {cpu_backend.unavailable_reason()}",
                allow_module_level=True)

ROWS = [0, 1, 5, 7, 16, 64, 65, 300]
# (in, out, group): out not a multiple of 16 or 64; a group as wide as the inputs
FEATURES = [(96, 200, 32), (160, 33, 32), (96, 33, 96), (576, 70, 64)]




@pytest.mark.parametrize("ordered, bias", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("in_features, out_features, group_size", FEATURES)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_the_reference(cpu_tier, rows, in_features, out_features, group_size, bits,
                               ordered, bias):
    """Tolerance: that of two fp32 sums of in_features products in different orders
    (``assert_close_to_product``, relative to |x| @ |W|^T + |bias| of the dequantized W)."""
    x, weight, b, seed = random_low_bit_problem(rows, in_features, out_features, bits, group_size,
                                        ordered, bias)
    packed = pack_weight(weight)
    expected = packed_linear(x, packed, b, backend="reference")
    assert_close_to_product(packed_linear(x, packed, b, backend="cpu"), expected, x,
                            weight.dequantize(), b, seed)


@pytest.mark.parametrize("groups", ["fp16", "fp32"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 12, 13, 64])
def test_bit_identical_to_fp32_panels_of_the_dequantized_weight(cpu_tier, rows, bits, groups):
    """Where q * scale is exact in fp32 (every checkpoint format), the weights dequantized in
    registers equal the reference's, so the low-bit GEMM gives the very bits of the fp32 GEMM
    on the dequantized weight with the inputs in the same order (the scales and offsets read
    from fp16, as packed, or from fp32)."""
    x, weight, b, seed = random_low_bit_problem(rows, 160, 200, bits, 32, True, True)
    in_stored_order = dataclasses.replace(weight, input_order=None).dequantize()
    dense = packed_linear(x[:, weight.input_order].contiguous(), pack_weight(in_stored_order), b,
                          backend="cpu")
    packed = pack_weight(weight)
    assert packed.scales.dtype == torch.float16
    packed = packed if groups == "fp16" else in_fp32_groups(packed)
    assert torch.equal(packed_linear(x, packed, b, backend="cpu"), dense), f"seed {seed}"


def test_scales_and_offsets_are_kept_in_fp16_where_it_holds_them_all():
    gen = torch.Generator().manual_seed(3)
    weight = random_quantized(40, 64, 4, 32, False, gen)
    assert pack_weight(weight).scales.dtype == pack_weight(weight).offsets.dtype == torch.float16
    for name, value in (("scales", 1 / 3), ("offsets", 1e-8), ("offsets", 7e4),
                        ("scales", float("nan"))):
        t = getattr(weight, name).clone()
        t[5, 1] = value
        changed = dataclasses.replace(weight, **{name: t})
        packed = pack_weight(changed)
        assert packed.scales.dtype == packed.offsets.dtype == torch.float32, (name, value)
        torch.testing.assert_close(packed.unpack().dequantize(), changed.dequantize(), rtol=0,
                                   atol=0, equal_nan=True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mode", ["fp32", "int8 activations", "bf16"])
def test_fp16_and_fp32_scales_give_the_same_bits(cpu_tier, bits, mode):
    """Every path of the cpu backend (one row, tiles, tiles dequantizing the panel once; int8
    activations; bf16 inputs) reads the fp16 scales and offsets as the fp32 ones they equal."""
    if mode == "int8 activations" and bits == 8:
        pytest.skip("int8 activations multiply 4-bit weights only")
    x, weight, b, seed = random_low_bit_problem(70, 96, 40, bits, 32, True, True)
    packed = pack_weight(weight)
    if mode == "int8 activations":
        packed = packed.with_int8_activations()
    x = x.bfloat16() if mode == "bf16" else x
    for rows in (1, 7, 70):
        half = packed_linear(x[:rows], packed, b, backend="cpu")
        full = packed_linear(x[:rows], in_fp32_groups(packed), b, backend="cpu")
        assert torch.equal(half, full), f"seed {seed}: {rows} rows"


def test_the_torch_backend_matches_the_reference():
    x, weight, b, seed = random_low_bit_problem(65, 576, 200, 4, 32, True, True)
    packed = pack_weight(weight)
    expected = packed_linear(x, packed, b, backend="reference")
    assert_close_to_product(packed_linear(x, packed, b, backend="torch"), expected, x,
                            weight.dequantize(), b, seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_16_bit_inputs_multiply_the_weight_rounded_to_their_dtype(dtype, backend):
    """The contract of the GPU's w4a16 kernels on every backend: 16-bit x times the
    dequantized weight rounded to x's dtype, summed in fp32, an fp32 result."""
    x, weight, b, seed = random_low_bit_problem(5, 160, 33, 4, 32, True, True)
    x = x.to(dtype)
    packed = pack_weight(weight)
    expected = packed_linear(x, packed, b, backend="reference")
    rounded = weight.dequantize().to(dtype).float()
    assert torch.allclose(expected, x.float() @ rounded.T + b, rtol=1e-5, atol=1e-5)
    actual = packed_linear(x, packed, b, backend=backend)
    assert actual.dtype == torch.float32
    assert_close_to_product(actual, expected, x.float(), rounded, b, seed)


@pytest.mark.parametrize("groups", ["fp16", "fp32"])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_does_not_depend_on_its_batch(cpu_tier, bits, groups):
    x, weight, b, seed = random_low_bit_problem(65, 576, 200, bits, 32, True, True)
    packed = pack_weight(weight)
    packed = packed if groups == "fp16" else in_fp32_groups(packed)
    batch = packed_linear(x, packed, b, backend="cpu")
    for row in (0, 13, 64):
        alone = packed_linear(x[row:row + 1], packed, b, backend="cpu")
        assert torch.equal(alone[0], batch[row]), f"seed {seed}: row {row}"
    wide = torch.randn(65, 700)
    wide[:, :576] = x
    assert torch.equal(packed_linear(wide[:, :576], packed, b, backend="cpu"), batch)


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_packing_keeps_the_weight(bits, ordered):
    seed = random.randrange(2**31)
    weight = random_quantized(33, 96, bits, 32, ordered, torch.Generator().manual_seed(seed))
    packed = pack_weight(weight)
    assert isinstance(packed, QuantizedPanels), f"seed {seed}"
    per_word = 32 // bits
    assert packed.codes.shape == (3, 96 // per_word, PANEL_WIDTH), f"seed {seed}"
    assert packed.scales.shape == packed.offsets.shape == (3, 3, PANEL_WIDTH), f"seed {seed}"
    # input k of column 32 sits in word k // per_word at bit bits * (k % per_word)
    word = int(packed.codes[2, 1, 0]) & 0xFFFFFFFF
    assert (word >> bits) & (2**bits - 1) == int(weight.codes[32, per_word + 1]), f"seed {seed}"
    assert not packed.codes[2, :, 1:].any() and not packed.scales[2, :, 1:].any()
    unpacked = packed.unpack()
    for field in ("codes", "scales", "offsets", "input_order"):
        a, b = getattr(unpacked, field), getattr(weight, field)
        assert (a is None and b is None) or torch.equal(a, b), f"seed {seed}: {field}"
    assert (unpacked.bits, unpacked.group_size) == (bits, 32)
    assert torch.equal(packed.dense_weight(), weight.dequantize()), f"seed {seed}"


def test_nbytes_counts_what_stays_in_memory():
    gen = torch.Generator().manual_seed(0)
    four = pack_weight(random_quantized(960, 576, 4, 32, False, gen))
    assert four.nbytes == 960 * 576 // 2 + 2 * 2 * 960 * 576 // 32  # codes, fp16 groups
    assert in_fp32_groups(four).nbytes == 960 * 576 // 2 + 2 * 4 * 960 * 576 // 32
    eight = pack_weight(random_quantized(33, 96, 8, 32, True, gen))
    assert eight.nbytes == 48 * 96 + 2 * 2 * 48 * 3 + 8 * 96  # 48 padded outputs, input order
    assert pack_weight(torch.randn(33, 96)).nbytes == 48 * 96 * 4


@pytest.mark.parametrize("groups", ["fp16", "fp32"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_embedding_rows_are_the_dequantized_rows(backend, ordered, bits, groups):
    seed = random.randrange(2**31)
    weight = random_quantized(200, 96, bits, 32, ordered, torch.Generator().manual_seed(seed))
    ids = torch.tensor([0, 199, 17, 17, 32, 150])
    expected = weight.dequantize()[ids]
    packed = pack_weight(weight)
    packed = packed if groups == "fp16" else in_fp32_groups(packed)
    assert torch.equal(embedding_rows(packed, ids, backend=backend), expected), f"seed {seed}"
    assert embedding_rows(packed, ids[:0], backend=backend).shape == (0, 96)
    assert torch.equal(embedding_rows(packed, ids[::2], backend=backend), expected[::2])
    dense = torch.randn(200, 96).bfloat16()
    assert torch.equal(embedding_rows(pack_weight(dense), ids, backend=backend),
                       dense[ids].float())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_an_id_outside_the_table_is_named(backend):
    packed = pack_weight(random_quantized(33, 96, 4, 32, False, torch.Generator().manual_seed(0)))
    for ids in ([3, 33], [-1, 0]):
        with pytest.raises(KernelInputError, match=r"ids must lie in \[0, 33\) .* got values "
                           rf"in \[{min(ids)}, {max(ids)}\]"):
            embedding_rows(packed, torch.tensor(ids), backend=backend)


def test_bad_arguments_are_named():
    gen = torch.Generator().manual_seed(1)
    weight = random_quantized(33, 96, 4, 32, True, gen)
    packed = pack_weight(weight)
    x = torch.randn(4, 96)
    with pytest.raises(KernelInputError, match="weight.group_size 4 must be a multiple of 8"):
        pack_weight(random_quantized(33, 96, 4, 4, False, gen))
    too_large = dataclasses.replace(weight, codes=weight.codes | 0x10)
    with pytest.raises(KernelInputError, match=r"weight.codes must be below 2\*\*4"):
        pack_weight(too_large)
    with pytest.raises(KernelInputError, match="weight must be a tensor or a QuantizedWeight"):
        pack_weight(weight.codes.numpy())
    with pytest.raises(KernelInputError, match=r"x must be \[rows, 96\] .* in float32 or "
                       r"bfloat16 or float16, got torch.float64"):
        packed_linear(x.double(), packed)
    with pytest.raises(KernelInputError, match=r"bias must be fp32 \[33\]"):
        packed_linear(x, packed, torch.randn(33).double())
    with pytest.raises(KernelInputError, match=r"packed.codes must be contiguous int32"):
        packed_linear(x, dataclasses.replace(packed, codes=packed.codes[:, :6].contiguous()))
    with pytest.raises(KernelInputError, match=r"packed.offsets must be contiguous fp16 or fp32"):
        packed_linear(x, dataclasses.replace(packed, offsets=packed.offsets.double()))
    with pytest.raises(KernelInputError, match=r"packed.offsets must be .* \(as packed.scales\)"):
        packed_linear(x, dataclasses.replace(packed, offsets=packed.offsets.float()))
    with pytest.raises(KernelInputError, match=r"packed.input_order must be None or"):
        packed_linear(x, dataclasses.replace(packed, input_order=packed.input_order.int()))
    with pytest.raises(KernelInputError, match=r"packed.bits 3 and packed.group_size 32"):
        packed_linear(x, dataclasses.replace(packed, bits=3))
    with pytest.raises(KernelInputError, match=r"ids must be int64 \[n\]"):
        embedding_rows(packed, torch.tensor([[3]]))


@pytest.mark.parametrize("ordered, bias", [(False, False), (True, True)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("in_features, out_features, group_size", FEATURES)
@pytest.mark.parametrize("rows", ROWS)
def test_bf16_inputs_match_the_reference(cpu_tier, rows, in_features, out_features, group_size,
                                         bits, ordered, bias):
    """bf16 x: the weights rounded to bf16, products summed in fp32. On the avx512 tier of a
    CPU with AVX512-BF16 the cpu backend multiplies with its dot products, elsewhere it widens
    x to fp32 for the reference; the tolerance is that of two fp32 sums either way."""
    x, weight, b, seed = random_low_bit_problem(rows, in_features, out_features, bits, group_size,
                                        ordered, bias)
    x = x.bfloat16()
    packed = pack_weight(weight)
    expected = packed_linear(x, packed, b, backend="reference")
    actual = packed_linear(x, packed, b, backend="cpu")
    assert_close_to_product(actual, expected, x.float(), weight.dequantize().bfloat16(), b, seed)


def test_bf16_dot_products_run_on_the_avx512_tier_of_a_cpu_that_has_them(monkeypatch):
    if "avx512_bf16" not in cpu_isa.cpu_flags():
        pytest.skip("this CPU has no AVX512-BF16")
    on_avx512 = cpu_isa.tier_at_least(cpu_isa.cpu_isa(), "avx512")
    assert (cpu_backend.bf16_dot_rows() is not None) == on_avx512
    monkeypatch.setenv(cpu_isa.ENV_VAR, "avx2")
    assert cpu_backend.bf16_dot_rows() is None
