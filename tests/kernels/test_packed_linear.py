"""packed_linear against the reference (the plain matmul on the unpacked weight), on every CPU
tier of the cpu backend this CPU offers, on fresh random data each run."""

from __future__ import annotations

import random

import pytest
import torch
from kvpage_kernels import (
    KernelInputError,
    PackedWeight,
    cpu_backend,
    pack_weight,
    packed_linear,
)
from kvpage_kernels.packed_weight import PANEL_WIDTH

from .cases import assert_close_to_product

if cpu_backend.unavailable_reason() is not None:
    pytest.skip(f"cpu backend unavailable: {cpu_backend.unavailable_reason()}",
                allow_module_level=True)

ROWS = [0, 1, 5, 6, 7, 16, 64, 65, 300]
FEATURES = [(96, 200), (100, 33), (576, 960)]  # (in, out): out not a multiple of 16 or 64


def random_linear(rows: int, in_features: int, out_features: int, dtype: torch.dtype,
                  bias: bool):
    """(x, weight, bias, seed) drawn from a fresh seed."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen) if bias else None
    return x, weight, b, seed


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_features, out_features", FEATURES)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_the_reference(cpu_tier, rows, in_features, out_features, bias):
    x, weight, b, seed = random_linear(rows, in_features, out_features, torch.float32, bias)
    packed = pack_weight(weight)
    expected = packed_linear(x, packed, b, backend="reference")
    assert_close_to_product(packed_linear(x, packed, b, backend="cpu"), expected, x, weight, b,
                            seed)


@pytest.mark.parametrize("rows", [1, 7, 65])
def test_bf16_weights_are_widened_to_fp32(cpu_tier, rows):
    x, weight, b, seed = random_linear(rows, 100, 33, torch.bfloat16, True)
    packed = pack_weight(weight)
    assert packed.dtype == torch.bfloat16
    expected = x @ weight.float().T + b
    assert_close_to_product(packed_linear(x, packed, b, backend="cpu"), expected, x, weight, b,
                            seed)


def test_the_torch_backend_matches_the_reference():
    x, weight, b, seed = random_linear(65, 576, 960, torch.float32, True)
    packed = pack_weight(weight)
    expected = packed_linear(x, packed, b, backend="reference")
    assert_close_to_product(packed_linear(x, packed, b, backend="torch"), expected, x, weight, b,
                            seed)


def test_a_row_does_not_depend_on_its_batch(cpu_tier):
    """Each output is one chain over the inputs in order: a row alone, in a tile of another
    size or in a strided view gives the very same bits."""
    x, weight, b, seed = random_linear(65, 576, 200, torch.float32, True)
    packed = pack_weight(weight)
    batch = packed_linear(x, packed, b, backend="cpu")
    for row in (0, 13, 64):
        alone = packed_linear(x[row:row + 1], packed, b, backend="cpu")
        assert torch.equal(alone[0], batch[row]), f"seed {seed}: row {row}"
    wide = torch.randn(65, 700)
    wide[:, :576] = x
    assert torch.equal(packed_linear(wide[:, :576], packed, b, backend="cpu"), batch)


def test_packing_keeps_the_weight():
    weight = torch.randn(33, 100)
    packed = pack_weight(weight)
    assert packed.panels.shape == (3, 100, PANEL_WIDTH)
    assert (packed.out_features, packed.in_features) == (33, 100)
    assert torch.equal(packed.panels[2, :, 0], weight[32])
    assert not packed.panels[2, :, 1:].any()  # the columns past out_features are zeros
    assert torch.equal(packed.unpack(), weight)


def test_the_library_reads_the_panels_pack_weight_makes(cpu_tier):
    assert cpu_backend.library().kvpage_panel_width() == PANEL_WIDTH


def test_bad_arguments_are_named():
    packed = pack_weight(torch.randn(33, 100))
    x = torch.randn(4, 100)
    with pytest.raises(KernelInputError, match="weight must be fp32 or bf16"):
        pack_weight(torch.randn(33, 100, dtype=torch.float16))
    with pytest.raises(KernelInputError, match=r"weight must be \[out_features, in_features\]"):
        pack_weight(torch.randn(100))
    with pytest.raises(KernelInputError, match=r"x must be \[rows, 100\] .* in float32, got"):
        packed_linear(x.bfloat16(), packed)  # 16-bit inputs are for low-bit weights only
    with pytest.raises(KernelInputError, match=r"x must be \[rows, 100\] .* in float32, got"):
        packed_linear(torch.randn(4, 99), packed)
    with pytest.raises(KernelInputError, match=r"bias must be fp32 \[33\]"):
        packed_linear(x, packed, torch.randn(32))
    with pytest.raises(KernelInputError, match="packed must be a PackedWeight"):
        packed_linear(x, torch.randn(33, 100))
    with pytest.raises(KernelInputError, match=r"packed.panels must be contiguous fp32 or bf16"):
        packed_linear(x, PackedWeight(packed.panels[:, :, :8].contiguous(), 33, 100))
