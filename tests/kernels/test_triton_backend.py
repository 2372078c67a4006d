"""Triton kernels against the reference. Without a GPU they run in the Triton interpreter
(about 4 ms per program and key tile), so the shapes here are tiny."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from kvpage_kernels import (
    copy_blocks,
    int8_rounded,
    pack_weight,
    packed_linear,
    paged_attention,
    select_backend,
    write_kv,
)

from .cases import (
    assert_close,
    assert_close_to_product,
    check_large_num_blocks,
    make_problem,
    poisoned_like,
    random_quantized,
)

triton_backend = pytest.importorskip("kvpage_kernels.triton_backend",
                                     reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(problem, **kwargs):
    expected = paged_attention(*problem.args(), out=poisoned_like(problem.q),
                               backend="reference", **kwargs)
    actual = paged_attention(*problem.args(), out=poisoned_like(problem.q), backend="triton",
                             **problem.hints(), **kwargs)
    assert_close(actual, expected, f"seed {problem.seed}")


def _split(problem, num_splits, **kwargs):
    expected = paged_attention(*problem.args(), out=poisoned_like(problem.q),
                               backend="reference", **kwargs)
    actual = triton_backend.paged_attention(
        *problem.args(), out=poisoned_like(problem.q), max_query_len=1, num_splits=num_splits,
        partition=32, sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"))
    assert_close(actual, expected, f"seed {problem.seed}")


def test_backend_is_selectable():
    assert select_backend(DEVICE, "triton") == "triton"


def test_mixed_batch_gqa4_block8_head80():
    _check(make_problem([21, 1, 35, 12, 6], [21, 1, 3, 1, 0], num_kv_heads=1, group=4,
                        head_dim=80, block_size=8, device=DEVICE))


def test_long_context_decode_unified_and_split():
    problem = make_problem([1030, 1], [1, 1], num_kv_heads=1, group=4, device=DEVICE)
    _check(problem)
    expected = paged_attention(*problem.args(), backend="reference")
    actual = triton_backend.paged_attention(*problem.args(), out=poisoned_like(problem.q),
                                            max_query_len=1, num_splits=4, partition=288)
    assert_close(actual, expected, f"seed {problem.seed}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_types_block32(dtype):
    _check(make_problem([3, 40], [1, 1], num_kv_heads=2, group=1, block_size=32, dtype=dtype,
                        device=DEVICE))


def test_gqa8_head256():
    _check(make_problem([18, 5], [1, 5], num_kv_heads=1, group=8, head_dim=256,
                        device=DEVICE))


def test_sliding_window_and_softcap_prefill_chunk():
    problem = make_problem([40, 9], [12, 1], num_kv_heads=1, group=2, device=DEVICE)
    problem.q *= 6
    _check(problem, sliding_window=10, softcap=4.0)


@pytest.mark.parametrize("window", [None, 20])
def test_split_kv_decode(window):
    problem = make_problem([45, 5, 33], [1, 1, 1], num_kv_heads=1, group=4, device=DEVICE)
    _split(problem, num_splits=3, sliding_window=window)


def test_split_kv_decode_softcap_bf16():
    problem = make_problem([30, 17], [1, 1], num_kv_heads=2, group=1, dtype=torch.bfloat16,
                           device=DEVICE)
    _split(problem, num_splits=2, softcap=3.0)


def test_num_splits_choice():
    assert triton_backend.choose_num_splits(1, 8, 8192, num_sms=132) == 16
    assert triton_backend.choose_num_splits(4, 8, 8192, num_sms=132) == 9
    assert triton_backend.choose_num_splits(64, 8, 8192, num_sms=132) == 1
    assert triton_backend.choose_num_splits(1, 8, 300, num_sms=132) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_skips_padding(dtype):
    k_cache = torch.randn(4, 8, 2, 80, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([5, -1, 30, 9], dtype=torch.int64, device=DEVICE)
    qkv = torch.randn(4, 3, 2, 80, device=DEVICE).to(dtype)  # strided k and v views
    k, v = qkv[:, 1], qkv[:, 2]
    write_kv(k, v, k_cache, v_cache, slots, backend="triton")
    write_kv(k, v, expected_k, expected_v, slots, backend="reference")
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_copy_blocks():
    caches = [(torch.randn(6, 8, 2, 16, device=DEVICE), torch.randn(6, 8, 2, 16, device=DEVICE))
              for _ in range(2)]
    expected = [(k.clone(), v.clone()) for k, v in caches]
    pairs = [(0, 3), (5, 1)]
    copy_blocks(caches, pairs, backend="triton")
    copy_blocks(expected, pairs, backend="reference")
    for (k, v), (ek, ev) in zip(caches, expected, strict=True):
        assert torch.equal(k, ek) and torch.equal(v, ev)


def test_large_num_blocks_uses_64bit_offsets():
    check_large_num_blocks("triton", DEVICE)


@pytest.mark.parametrize("rows, in_features, out_features, group_size, bits, ordered, bias, dtype, splits", [
    (1, 64, 33, 32, 4, False, True, torch.float32, None),
    (5, 96, 40, 32, 8, True, False, torch.float32, None),
    (17, 64, 20, 64, 4, True, True, torch.float32, None),
    (0, 64, 33, 32, 8, False, False, torch.float32, None),
    (3, 256, 40, 32, 4, True, True, torch.float32, 3),  # split-K: partial sums added up
    (4, 192, 20, 96, 4, False, True, torch.float32, 2),  # tiles of 64 inputs across groups
    pytest.param(2, 128, 24, 128, 4, False, True, torch.bfloat16, 2, marks=pytest.mark.skipif(
        DEVICE == "cpu", reason="the Triton interpreter's bf16 dot and rounding are not a GPU's")),
    (18, 96, 17, 32, 8, True, False, torch.float16, None),
])
def test_quantized_linear(rows, in_features, out_features, group_size, bits, ordered, bias,
                          dtype, splits):
    """Low-bit packed_linear against the reference (x @ the dequantized weight^T, rounded to
    x's dtype for 16-bit x), with the tolerance of two fp32 sums in different orders
    (``assert_close_to_product``)."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    weight = random_quantized(out_features, in_features, bits, group_size, ordered, gen)
    weight = dataclasses.replace(weight, **{
        name: getattr(weight, name).to(DEVICE)
        for name in ("codes", "scales", "offsets", "input_order")
        if getattr(weight, name) is not None})
    packed = pack_weight(weight)
    x = torch.randn(rows, in_features, generator=gen).to(DEVICE, dtype)
    b = torch.randn(out_features, generator=gen).to(DEVICE) if bias else None
    expected = packed_linear(x, packed, b, backend="reference")
    actual = (packed_linear(x, packed, b, backend="triton") if splits is None
              else triton_backend.packed_linear(x, packed, b, num_splits=splits))
    assert_close_to_product(actual.cpu(), expected.cpu(), x.float().cpu(),
                            weight.dequantize().to(dtype).float().cpu(),
                            None if b is None else b.cpu(), seed)


def test_quantized_linear_on_int8_activations():
    """4-bit weights with int8 activations: the rounded x through the same GEMM."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    weight = random_quantized(40, 216, 4, 72, True, gen)
    packed = pack_weight(dataclasses.replace(weight, **{
        name: getattr(weight, name).to(DEVICE)
        for name in ("codes", "scales", "offsets", "input_order")})).with_int8_activations()
    x = torch.randn(9, 216, generator=gen).to(DEVICE)
    expected = packed_linear(x, packed, None, backend="reference")
    actual = packed_linear(x, packed, None, backend="triton")
    rounded = int8_rounded(x, 72, packed.input_order)
    assert_close_to_product(actual.cpu(), expected.cpu(), rounded.cpu(),
                            weight.dequantize(), None, seed)
