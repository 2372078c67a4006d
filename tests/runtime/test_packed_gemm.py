"""Weights packed for the CPU's GEMM library compute what F.linear computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kvpage_runtime.layers.embedding import LMHead
from kvpage_runtime.layers.linear import Linear
from kvpage_runtime.layers.packed_gemm import ENV_VAR, pack_linear_weight, pack_model_weights

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matches_linear_for_any_row_count(dtype, bias):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 96, generator=gen).to(dtype)
    b = torch.randn(200, generator=gen).to(dtype) if bias else None
    packed = pack_linear_weight(weight)
    if packed is None:
        pytest.skip(f"this torch build has no packed GEMM for {dtype}")
    for rows in (0, 1, 5, 16, 64, 65, 300):
        x = torch.randn(rows, 96, generator=gen).to(dtype)
        expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
        actual = packed(x, b)
        assert actual.shape == (rows, 200) and actual.dtype == dtype
        torch.testing.assert_close(actual.float(), expected, atol=TOLERANCE[dtype] * 10,
                                   rtol=TOLERANCE[dtype])


def test_strided_input_rows():
    weight = torch.randn(64, 32)
    packed = pack_linear_weight(weight)
    if packed is None:
        pytest.skip("this torch build has no packed fp32 GEMM")
    wide = torch.randn(16, 80)
    torch.testing.assert_close(packed(wide[:, 8:40], None), F.linear(wide[:, 8:40], weight))


def test_modules_use_their_packs_and_the_switch_turns_them_off(monkeypatch):
    linear = Linear(48, [32, 16], bias=True)
    head = LMHead(100, 48, torch.float32)
    for p in (linear.weight, linear.bias, head.weight):
        p.data.normal_()  # weights are uninitialized until loaded
    x = torch.randn(7, 48)
    plain = linear(x), head(x)
    model = torch.nn.ModuleList([linear, head])
    monkeypatch.setenv(ENV_VAR, "0")
    pack_model_weights(model)
    assert linear.packed is None and head.packed is None
    monkeypatch.delenv(ENV_VAR)
    pack_model_weights(model)
    if linear.packed is None:
        pytest.skip("this torch build has no packed fp32 GEMM")
    assert head.packed is not None
    assert "packed" not in dict(model.named_parameters()) and not any(
        "packed" in name for name in model.state_dict())
    torch.testing.assert_close(linear(x), plain[0])
    torch.testing.assert_close(head(x), plain[1])
