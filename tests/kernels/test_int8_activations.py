"""packed_linear on 4-bit weights with int8 activations (``QuantizedPanels.
with_int8_activations``): ``int8_rounded``, the rounding every backend applies; the cpu
backend's integer GEMM against the reference (x rounded, times the dequantized weight) on every
CPU tier this CPU offers, the same bits on every tier; the fused decoder stack on such weights;
the refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kvpage_kernels import (
    KernelInputError,
    cpu_backend,
    cpu_isa,
    int8_rounded,
    pack_weight,
    packed_linear,
)

from .cases import assert_close_to_product, random_low_bit_problem, random_quantized

if cpu_backend.unavailable_reason() is not None:
    pytest.skip(f"cpu backend unavailable: {cpu_backend.unavailable_reason()}",
                allow_module_level=True)

ROWS = [0, 1, 3, 8, 9, 16, 65, 300]
# (in, out, group): out not a multiple of 8 or 16; groups of 96 and 72 end in a short block
FEATURES = [(96, 200, 32), (160, 33, 32), (96, 33, 96), (216, 40, 72), (576, 70, 64)]


def random_problem(rows: int, in_features: int, out_features: int, group_size: int,
                   ordered: bool, bias: bool):
    """(x, 4-bit weight, bias, seed) drawn from a fresh seed."""
    return random_low_bit_problem(rows, in_features, out_features, 4, group_size, ordered, bias)


def summed_magnitudes(weight) -> torch.Tensor:
    """|q s| + |m| of every weight: the magnitudes the integer GEMM's fp32 steps sum."""
    return dataclasses.replace(weight, offsets=weight.offsets.abs()).dequantize()


def test_rounding_steps_are_each_blocks_largest_value_over_127():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 72, generator=gen) * torch.tensor([1.0, 100.0, 1e-3])[:, None]
    x[1, 32:64] = 0  # a block of zeros
    rounded = int8_rounded(x, group_size=72)
    for first, last in [(0, 32), (32, 64), (64, 72)]:  # blocks of 32 within the group of 72
        block, out = x[:, first:last], rounded[:, first:last]
        step = block.abs().amax(dim=1, keepdim=True) / 127
        levels = torch.where(step > 0, out / step, torch.zeros_like(out))
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert levels.abs().max() <= 127 + 1e-3
        assert ((out - block).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(rounded[1, 32:64], torch.zeros(32))
    assert torch.equal(rounded[0, :32].abs().max(), x[0, :32].abs().max())  # the max is exact


def test_rounding_follows_the_input_order_and_keeps_nans_in_their_block():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, generator=gen)
    order = torch.randperm(64, generator=gen)
    in_order = int8_rounded(x[:, order], group_size=32)
    natural = torch.empty_like(in_order)
    natural[:, order] = in_order
    assert torch.equal(int8_rounded(x, 32, order), natural)
    x[0, 3] = float("nan")
    rounded = int8_rounded(x, 32)
    assert rounded[0, :32].isnan().all() and not rounded[0, 32:].isnan().any()
    assert not rounded[1].isnan().any()


@pytest.mark.parametrize("ordered, bias", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("in_features, out_features, group_size", FEATURES)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_the_reference(cpu_tier, rows, in_features, out_features, group_size, ordered,
                               bias):
    """The reference multiplies int8_rounded(x) by the dequantized weight in fp32; the kernel
    sums the same products in integers and scales them in fp32 (``assert_close_to_product``
    over the magnitudes its fp32 steps sum)."""
    x, weight, b, seed = random_problem(rows, in_features, out_features, group_size, ordered,
                                        bias)
    packed = pack_weight(weight).with_int8_activations()
    expected = packed_linear(x, packed, b, backend="reference")
    rounded = int8_rounded(x, group_size, weight.input_order)
    assert torch.allclose(expected, rounded @ weight.dequantize().T + (0 if b is None else b))
    actual = packed_linear(x, packed, b, backend="cpu")
    assert_close_to_product(actual, expected, rounded, summed_magnitudes(weight), b, seed)


def test_every_tier_gives_the_same_bits(monkeypatch):
    x, weight, b, seed = random_problem(19, 216, 40, 72, True, True)
    packed = pack_weight(weight).with_int8_activations()
    results = {}
    for tier in cpu_isa.TIERS:
        if cpu_isa.tier_at_least(cpu_isa.detected_isa(), tier):
            monkeypatch.setenv(cpu_isa.ENV_VAR, tier)
            results[tier] = packed_linear(x, packed, b, backend="cpu")
    assert len(results) >= 2  # scalar and at least the CPU's own
    first = next(iter(results.values()))
    assert all(torch.equal(r, first) for r in results.values()), f"seed {seed}"


def test_a_row_does_not_depend_on_its_batch(cpu_tier):
    x, weight, b, seed = random_problem(65, 576, 200, 32, True, True)
    packed = pack_weight(weight).with_int8_activations()
    batch = packed_linear(x, packed, b, backend="cpu")
    for row in (0, 13, 64):
        alone = packed_linear(x[row:row + 1], packed, b, backend="cpu")
        assert torch.equal(alone[0], batch[row]), f"seed {seed}: row {row}"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_16_bit_inputs_are_rounded_from_their_fp32_values(backend):
    x, weight, b, seed = random_problem(5, 160, 33, 32, False, True)
    packed = pack_weight(weight).with_int8_activations()
    x = x.bfloat16()
    expected = packed_linear(x.float(), packed, b, backend="reference")
    assert_close_to_product(packed_linear(x, packed, b, backend=backend), expected,
                            int8_rounded(x, 32), summed_magnitudes(weight), b, seed)


def test_int8_activations_need_4_bit_weights():
    gen = torch.Generator().manual_seed(2)
    packed = pack_weight(random_quantized(16, 64, 8, 32, False, gen))
    with pytest.raises(KernelInputError, match="4-bit weights only, these have 8 bits"):
        packed.with_int8_activations()
    forced = dataclasses.replace(packed, int8_activations=True)
    with pytest.raises(KernelInputError, match="int8_activations needs 4-bit weights"):
        packed_linear(torch.randn(2, 64), forced)
    four = pack_weight(random_quantized(16, 64, 4, 32, False, gen))
    assert not four.with_int8_activations().with_int8_activations(False).int8_activations


@pytest.mark.parametrize("ordered", [False, True])
def test_a_nan_spoils_its_own_row_alone(cpu_tier, ordered):
    x, weight, b, seed = random_problem(9, 96, 40, 32, ordered, True)
    x[3, 50] = float("nan")
    packed = pack_weight(weight).with_int8_activations()
    out = packed_linear(x, packed, b, backend="cpu")
    assert out[3].isnan().all() and not out[torch.arange(9) != 3].isnan().any()
    assert torch.equal(out.isnan(), packed_linear(x, packed, b, backend="reference").isnan())
