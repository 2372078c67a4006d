"""The fast torch backend against the reference, on fresh random inputs each run."""

from __future__ import annotations

import pytest
import torch
from kvpage_kernels import paged_attention, write_kv

from .cases import assert_close, check_large_num_blocks, make_problem, poisoned_like

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(problem, backend="torch", hints=True, **kwargs):
    expected = paged_attention(*problem.args(), out=poisoned_like(problem.q),
                               backend="reference", **kwargs)
    extra = problem.hints() if hints else {}
    actual = paged_attention(*problem.args(), out=poisoned_like(problem.q), backend=backend,
                             **extra, **kwargs)
    assert_close(actual, expected, f"seed {problem.seed}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_batch(dtype, group):
    lens = [1, 5, 16, 17, 100, 333]
    _check(make_problem(lens, [1] * len(lens), group=group, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_mixed_prefill_and_decode(dtype, block_size):
    lens, q_lens = [40, 1, 77, 1030, 9], [40, 1, 13, 1, 9]
    _check(make_problem(lens, q_lens, group=4, block_size=block_size, dtype=dtype))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(head_dim):
    _check(make_problem([20, 35, 3], [1, 6, 3], head_dim=head_dim, num_kv_heads=1, group=2))


@pytest.mark.parametrize("window", [1, 7, 32])
@pytest.mark.parametrize("q_lens", [[1, 1, 1], [1, 30, 5]])
def test_sliding_window(window, q_lens):
    _check(make_problem([50, 64, 6], q_lens, group=2), sliding_window=window)


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [1, 30, 5]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap(q_lens, dtype):
    problem = make_problem([50, 64, 6], q_lens, group=3, dtype=dtype)
    problem.q *= 8  # large scores so that the cap matters
    _check(problem, softcap=5.0)
    _check(problem, softcap=5.0, sliding_window=20)


@pytest.mark.parametrize("window", [None, 40])
def test_decode_batch_larger_than_a_chunk(window):
    lens = [(37 * i) % 90 + 1 for i in range(70)]
    _check(make_problem(lens, [1] * len(lens), num_kv_heads=3, group=3), sliding_window=window)


def test_without_hints_and_long_context():
    _check(make_problem([1500, 2], [1, 2], num_kv_heads=3, group=3), hints=False)


def test_empty_query_rows_are_allowed():
    _check(make_problem([10, 4, 8], [2, 0, 1]))


def test_matches_contiguous_sdpa():
    problem = make_problem([24], [24], num_kv_heads=2, group=2)
    keys = paged_cache_to_contiguous(problem.k_cache, problem.block_tables[0], 24)
    values = paged_cache_to_contiguous(problem.v_cache, problem.block_tables[0], 24)
    expected = torch.nn.functional.scaled_dot_product_attention(
        problem.q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
        is_causal=True, enable_gqa=True).transpose(0, 1)
    actual = paged_attention(*problem.args(), backend="torch")
    assert_close(actual, expected)


def paged_cache_to_contiguous(cache, table, length):
    block_size = cache.shape[1]
    rows = [cache[table[p // block_size], p % block_size] for p in range(length)]
    return torch.stack(rows)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_skips_padding(backend, dtype):
    num_blocks, block_size, heads, dim = 6, 8, 2, 80
    k_cache = torch.randn(num_blocks, block_size, heads, dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, heads, dim).to(dtype)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([3, -1, 47, 8, -1, 21], dtype=torch.int64)
    k = torch.randn(6, heads, dim).to(dtype)
    v = torch.randn(6, heads, dim).to(dtype)
    write_kv(k, v, k_cache, v_cache, slots, backend=backend)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            before_k[slot // block_size, slot % block_size] = k[i]
            before_v[slot // block_size, slot % block_size] = v[i]
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)


def test_large_num_blocks_uses_64bit_offsets():
    check_large_num_blocks("torch", "cpu")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_strided_q_k_v_from_a_fused_projection(backend):
    """The runtime's q, k, v are views into one qkv projection output."""
    problem = make_problem([9, 30], [9, 1], num_kv_heads=1, group=2, head_dim=64)
    qkv = torch.randn(10, 4, 64)
    q, k, v = qkv[:, :2], qkv[:, 2:3], qkv[:, 3:]
    slots = torch.tensor([problem.block_tables[0, p // 16] * 16 + p % 16 for p in range(9)]
                         + [problem.block_tables[1, 1] * 16 + 13], dtype=torch.int64)
    write_kv(k, v, problem.k_cache, problem.v_cache, slots, backend=backend)
    problem.q = q
    _check(problem, backend=backend)


def test_step_plan_follows_in_place_metadata_changes():
    """The plan computed once per step must not survive an in-place change of the metadata."""
    problem = make_problem([40, 30, 3], [1, 1, 1], num_kv_heads=1, group=2)
    _check(problem)
    problem.seq_lens[0] -= 5
    problem.max_seq_len = 35
    _check(problem)
