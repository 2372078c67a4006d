"""The compiled CPU backend against the reference, on fresh random inputs each run."""

from __future__ import annotations

import pytest
import torch
from kvpage_kernels import KernelBackendUnavailable, cpu_backend, paged_attention, select_backend

from .cases import assert_close, check_large_num_blocks, make_problem, poisoned_like

if cpu_backend.unavailable_reason() is not None:
    pytest.skip(f"cpu backend unavailable: {cpu_backend.unavailable_reason()}",
                allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16]


def _check(problem, hints=True, **kwargs):
    expected = paged_attention(*problem.args(), out=poisoned_like(problem.q),
                               backend="reference", **kwargs)
    extra = problem.hints() if hints else {}
    actual = paged_attention(*problem.args(), out=poisoned_like(problem.q), backend="cpu",
                             **extra, **kwargs)
    assert_close(actual, expected)


def test_is_the_cpu_default():
    assert select_backend("cpu") == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_decode_batch(dtype, group, block_size):
    lens = [1, 5, 16, 17, 100, 333]
    _check(make_problem(lens, [1] * len(lens), group=group, block_size=block_size, dtype=dtype))


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
def test_mixed_prefill_and_decode(dtype):
    """Decode rows run in the kernel, prefill chunks in the torch backend, into one output."""
    lens, q_lens = [40, 1, 77, 1030, 9], [40, 1, 13, 1, 9]
    _check(make_problem(lens, q_lens, group=4, dtype=dtype))
    _check(make_problem(lens, q_lens, group=4, dtype=dtype), hints=False)


@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
def test_head_dims(head_dim):
    _check(make_problem([20, 35, 3], [1, 1, 1], head_dim=head_dim, num_kv_heads=1, group=2))


@pytest.mark.parametrize("window", [1, 7, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sliding_window(window, dtype):
    _check(make_problem([50, 64, 6], [1, 1, 1], group=2, dtype=dtype), sliding_window=window)
    _check(make_problem([50, 64, 6], [1, 30, 5], group=2, dtype=dtype), sliding_window=window)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap(dtype):
    problem = make_problem([50, 64, 6], [1, 1, 1], group=3, dtype=dtype)
    problem.q *= 8  # large scores so that the cap matters
    _check(problem, softcap=5.0)
    _check(problem, softcap=5.0, sliding_window=20)


def test_strided_q_and_out_views():
    """The runtime's q is a view of a fused projection (its heads are not packed)."""
    problem = make_problem([9, 30, 70], [1, 1, 1], num_kv_heads=2, group=3)
    wide = torch.randn(3, 9, 64)
    wide[:, :6] = problem.q
    problem.q = wide[:, :6]
    _check(problem)
    out = torch.full((3, 12, 64), 1234.5)[:, ::2]
    result = paged_attention(*problem.args(), out=out, backend="cpu")
    assert_close(result, paged_attention(*problem.args(), backend="reference"))


def test_empty_query_rows_and_empty_batch():
    _check(make_problem([10, 4, 8], [2, 0, 1]))
    problem = make_problem([10], [1])
    empty = torch.zeros(0, dtype=torch.int32)
    out = paged_attention(problem.q[:0], problem.k_cache, problem.v_cache,
                          problem.block_tables[:0], empty, torch.zeros(1, dtype=torch.int32),
                          0.125, backend="cpu")
    assert out.shape == (0, *problem.q.shape[1:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_num_blocks_uses_64bit_offsets(dtype):
    check_large_num_blocks("cpu", "cpu", dtype)


def test_a_failed_build_names_the_compiler_error(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_backend, "SOURCE", broken)
    monkeypatch.setenv("KVPAGE_CACHE_DIR", str(tmp_path))
    cpu_backend.library.cache_clear()
    try:
        with pytest.raises(KernelBackendUnavailable, match="broken.cpp"):
            cpu_backend.library()
    finally:
        cpu_backend.library.cache_clear()


def test_without_a_compiler_the_reason_is_given(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_compiler", lambda: None)
    cpu_backend.library.cache_clear()
    try:
        assert "C++ compiler" in cpu_backend.unavailable_reason()
    finally:
        cpu_backend.library.cache_clear()
