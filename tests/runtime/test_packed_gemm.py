"""Weights packed for the CPU's GEMM library compute what F.linear computes; each dtype is
packed only where this CPU (and the CPU tier in use) runs the library's GEMM for it."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from kvpage_kernels import cpu_isa, select_backend
from kvpage_kernels.ops import ENV_VAR as KERNEL_BACKEND_ENV
from kvpage_runtime.layers import packed_gemm
from kvpage_runtime.layers.linear import Linear
from kvpage_runtime.layers.packed_gemm import (
    ENV_VAR,
    PanelLinear,
    choose_packing,
    pack_linear_weight,
    pack_model_weights,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
ONEDNN_SUPPORT = {torch.bfloat16: "_is_mkldnn_bf16_supported",
                  torch.float16: "_is_mkldnn_fp16_supported"}


def loaded_linear(dtype: torch.dtype, bias: bool) -> Linear:
    linear = Linear(96, [120, 80], bias=bias, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for p in linear.parameters():  # weights are uninitialized until loaded
        p.data.copy_(torch.randn(p.shape, generator=gen))
    linear.pack_weights()
    return linear


def packing_log(model: torch.nn.Module, caplog) -> list[str]:
    """What ``pack_model_weights(model)`` logs."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=packed_gemm.logger.name):
        pack_model_weights(model)
    return [r.getMessage() for r in caplog.records if r.name == packed_gemm.logger.name]


def this_cpu_runs_onednn(dtype: torch.dtype) -> bool:
    return (cpu_isa.tier_at_least(cpu_isa.cpu_isa(), "avx512")
            and getattr(torch.ops.mkldnn, ONEDNN_SUPPORT[dtype])())


@pytest.mark.parametrize("tier", ["detected", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_fp32_for_any_row_count(dtype, bias, tier, monkeypatch):
    if tier != "detected":
        monkeypatch.setenv(cpu_isa.ENV_VAR, tier)
    linear = loaded_linear(dtype, bias)
    assert (linear.packed is None) == (choose_packing(dtype).library is None)
    gen = torch.Generator().manual_seed(1)
    for rows in (0, 1, 5, 16, 64, 65, 300):
        x = torch.randn(rows, 96, generator=gen).to(dtype)
        expected = F.linear(x.float(), linear.weight.float(),
                            None if linear.bias is None else linear.bias.float())
        actual = linear(x)
        assert actual.shape == (rows, 200) and actual.dtype == dtype
        torch.testing.assert_close(actual.float(), expected, atol=TOLERANCE[dtype] * 10,
                                   rtol=TOLERANCE[dtype])


def test_onednn_sees_few_row_counts_and_little_padding():
    """oneDNN keeps a compiled kernel per row count: the rows it is given take 56 values below
    2,048 (every count up to 32), never fewer than asked, and at most a quarter more."""
    sizes = [packed_gemm.onednn_rows(rows) for rows in range(1, 2049)]
    assert len(set(sizes)) == 56
    assert sizes[:32] == list(range(1, 33))
    assert all(rows <= size <= rows * 1.25 for rows, size in enumerate(sizes, 1))
    assert sizes == sorted(sizes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_packed_with_onednn_where_the_cpu_runs_it(dtype):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    if not this_cpu_runs_onednn(dtype):
        pytest.skip(f"oneDNN has no {packed_gemm.DTYPE_NAMES[dtype]} GEMM on this CPU "
                    f"(tier {cpu_isa.cpu_isa()})")
    assert choose_packing(dtype).library == "onednn"
    assert loaded_linear(dtype, bias=False).packed is not None


def test_fp32_uses_kvpage_gemm_on_any_tier_else_mkl(monkeypatch):
    if select_backend("cpu") != "cpu":
        pytest.skip("the cpu kernel backend is unavailable here (no C++ compiler)")
    for tier in cpu_isa.TIERS:
        if cpu_isa.tier_at_least(cpu_isa.detected_isa(), tier):
            monkeypatch.setenv(cpu_isa.ENV_VAR, tier)
            assert choose_packing(torch.float32).library == "panels"
            assert isinstance(loaded_linear(torch.float32, bias=True).packed, PanelLinear)
    monkeypatch.setenv(KERNEL_BACKEND_ENV, "torch")  # as without a compiler
    expected = "mkl" if torch.backends.mkl.is_available() else None
    assert choose_packing(torch.float32).library == expected


@pytest.mark.parametrize("tier", ["avx2", "scalar"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_below_avx512_half_precision_uses_plain_weights(dtype, tier, monkeypatch):
    monkeypatch.setenv(cpu_isa.ENV_VAR, tier)
    packing = choose_packing(dtype)
    assert packing.library is None
    assert loaded_linear(dtype, bias=False).packed is None
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    assert str(packing).startswith(f"{name} weights are not packed: oneDNN's {name} GEMM needs")
    assert str(packing).endswith(f"(CPU tier in use: {cpu_isa.cpu_isa()}); using F.linear")


def test_the_choice_is_logged_once_per_dtype(monkeypatch, caplog):
    monkeypatch.setenv(cpu_isa.ENV_VAR, "avx2")
    model = torch.nn.ModuleList(
        [Linear(48, [32], dtype=torch.bfloat16), Linear(32, [48], dtype=torch.bfloat16),
         Linear(48, [100])])  # the last: an LM head
    assert packing_log(model, caplog) == [
        str(choose_packing(torch.bfloat16)), str(choose_packing(torch.float32))]
    assert packing_log(model, caplog)[0] == (
        "bf16 weights are not packed: oneDNN's bf16 GEMM needs AVX-512 BW/VL/DQ or "
        f"AVX-NE-CONVERT (CPU tier in use: {cpu_isa.cpu_isa()}); using F.linear")


def test_strided_input_rows():
    weight = torch.randn(64, 32)
    packed = pack_linear_weight(weight)
    if packed is None:
        pytest.skip(f"fp32 is not packed here: {choose_packing(torch.float32).why}")
    wide = torch.randn(16, 80)
    torch.testing.assert_close(packed(wide[:, 8:40], None), F.linear(wide[:, 8:40], weight))


def test_modules_use_their_packs_and_the_switch_turns_them_off(monkeypatch, caplog):
    linear = Linear(48, [32, 16], bias=True)
    head = Linear(48, [100])  # an LM head
    for p in (linear.weight, linear.bias, head.weight):
        p.data.normal_()  # weights are uninitialized until loaded
    x = torch.randn(7, 48)
    plain = linear(x), head(x)
    model = torch.nn.ModuleList([linear, head])
    monkeypatch.setenv(ENV_VAR, "0")
    assert packing_log(model, caplog) == [
        f"fp32 weights are not packed: {ENV_VAR}=0; using F.linear"]
    assert linear.packed is None and head.packed is None
    monkeypatch.delenv(ENV_VAR)
    pack_model_weights(model)
    if linear.packed is None:
        pytest.skip(f"fp32 is not packed here: {choose_packing(torch.float32).why}")
    assert head.packed is not None
    assert "packed" not in dict(model.named_parameters()) and not any(
        "packed" in name for name in model.state_dict())
    torch.testing.assert_close(linear(x), plain[0])
    torch.testing.assert_close(head(x), plain[1])
