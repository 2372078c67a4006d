"""The compiled CPU backend against the reference, on fresh random inputs each run; the
tests that take ``cpu_tier`` run once per CPU tier (scalar, avx2, avx512) this CPU offers."""

from __future__ import annotations

import logging
import math
import platform

import pytest
import torch
from kvpage_kernels import (
    KernelBackendUnavailable,
    KernelInputError,
    argmax,
    cpu_backend,
    cpu_isa,
    gelu_tanh_and_mul,
    paged_attention,
    rms_norm,
    rotary_embedding,
    route_experts,
    select_backend,
    silu_and_mul,
    write_kv,
)

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
    assert_close(actual, expected, f"seed {problem.seed}")


def test_is_the_cpu_default():
    assert select_backend("cpu") == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_decode_batch(cpu_tier, dtype, group, block_size):
    lens = [1, 5, 16, 17, 100, 333]
    _check(make_problem(lens, [1] * len(lens), group=group, block_size=block_size, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_decode_items_of_whole_sequences_and_of_single_heads(cpu_tier, threads, head_dim,
                                                              dtype):
    """Decode attention hands its threads whole sequences (all KV heads at once) when there
    are at least 4 per thread, else one KV head of a sequence: both ways agree with the
    reference, partial last chunks and groups that are no power of two included."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the kernels' OpenMP threads too (one libgomp)
    try:
        many = [1, 5, 16, 17, 40, 100, 7, 9, 33, 64, 3, 2, 8, 31, 15, 70]
        for lens in (many[: 4 * threads], many[: 4 * threads - 1]):
            for group in (1, 5):
                _check(make_problem(lens, [1] * len(lens), num_kv_heads=3, group=group,
                                    head_dim=head_dim, dtype=dtype))
    finally:
        torch.set_num_threads(previous)


def test_bf16_attention_is_the_fp32_result_rounded_as_torch_rounds(cpu_tier):
    """The kernel computes in fp32 whatever the cache holds: on bf16 values its bf16 output is
    its fp32 output on the same values, rounded to nearest even."""
    lens = [1, 5, 16, 17, 100, 333]
    problem = make_problem(lens, [1, 1, 16, 1, 30, 1], group=3, dtype=torch.bfloat16)
    q, k_cache, v_cache, *rest = problem.args()
    in_fp32 = paged_attention(q.float(), k_cache.float(), v_cache.float(), *rest, backend="cpu")
    in_bf16 = paged_attention(*problem.args(), backend="cpu")
    assert torch.equal(in_bf16, in_fp32.bfloat16()), f"seed {problem.seed}"


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
def test_mixed_prefill_and_decode(cpu_tier, dtype):
    """Prefill chunks (causal within the chunk, after the context cached before it) and decode
    rows run in one kernel call (fp16 in the torch backend), into one output."""
    lens, q_lens = [40, 1, 77, 1030, 9], [40, 1, 13, 1, 9]
    _check(make_problem(lens, q_lens, group=4, dtype=dtype))
    _check(make_problem(lens, q_lens, group=4, dtype=dtype), hints=False)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_prefill_items_of_whole_blocks_and_of_single_heads(cpu_tier, threads, head_dim):
    """A chunk's rows go in blocks of up to 4 consecutive rows; a thread takes a whole block
    when there are at least 4 blocks per thread, else one KV head of a block: prefill chunks
    agree with the reference both ways, a long chunk (blocks taken longest context first) and
    a chunk after a cached context of several blocks."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lens, q_lens in (([3, 2], [2, 1]), ([600, 50, 1], [600, 17, 1])):
            _check(make_problem(lens, q_lens, num_kv_heads=3, group=3, head_dim=head_dim))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("group", [2, 8])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
def test_head_dims(cpu_tier, head_dim, group):
    _check(make_problem([20, 35, 3], [1, 1, 1], head_dim=head_dim, num_kv_heads=1, group=group))
    _check(make_problem([20, 35, 3], [20, 9, 1], head_dim=head_dim, num_kv_heads=1, group=group))


@pytest.mark.parametrize("window", [1, 7, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sliding_window(cpu_tier, window, dtype):
    _check(make_problem([50, 64, 6], [1, 1, 1], group=2, dtype=dtype), sliding_window=window)
    _check(make_problem([50, 64, 6], [1, 30, 5], group=2, dtype=dtype), sliding_window=window)
    # contexts of several slices of 64 positions, a window start inside a vector of them
    _check(make_problem([300, 150], [1, 100], group=2, dtype=dtype), sliding_window=window + 60)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap(cpu_tier, dtype):
    problem = make_problem([50, 64, 6], [1, 1, 1], group=3, dtype=dtype)
    problem.q *= 8  # large scores so that the cap matters
    _check(problem, softcap=5.0)
    _check(problem, softcap=5.0, sliding_window=20)
    long = make_problem([200, 90], [70, 1], group=3, dtype=dtype)
    long.q *= 8
    _check(long, softcap=5.0)


def test_strided_q_and_out_views(cpu_tier):
    """The runtime's q is a view of a fused projection (its heads are not packed)."""
    problem = make_problem([9, 30, 70], [1, 1, 1], num_kv_heads=2, group=3)
    wide = torch.randn(3, 9, 64)
    wide[:, :6] = problem.q
    problem.q = wide[:, :6]
    _check(problem)
    out = torch.full((3, 12, 64), 1234.5)[:, ::2]
    result = paged_attention(*problem.args(), out=out, backend="cpu")
    assert_close(result, paged_attention(*problem.args(), backend="reference"),
                 f"seed {problem.seed}")


def test_empty_query_rows_and_empty_batch():
    _check(make_problem([10, 4, 8], [2, 0, 1]))
    problem = make_problem([10], [1])
    empty = torch.zeros(0, dtype=torch.int32)
    out = paged_attention(problem.q[:0], problem.k_cache, problem.v_cache,
                          problem.block_tables[:0], empty, torch.zeros(1, dtype=torch.int32),
                          0.125, backend="cpu")
    assert out.shape == (0, *problem.q.shape[1:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_num_blocks_uses_64bit_offsets(cpu_tier, dtype):
    check_large_num_blocks("cpu", "cpu", dtype)


def test_a_failed_build_names_the_compiler_error(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_backend, "SOURCE", broken)
    monkeypatch.setenv("KVPAGE_CACHE_DIR", str(tmp_path))
    cpu_backend._loaded.cache_clear()
    try:
        with pytest.raises(KernelBackendUnavailable, match="broken.cpp"):
            cpu_backend.library()
    finally:
        cpu_backend._loaded.cache_clear()


def test_without_a_compiler_the_reason_is_given(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_compiler", lambda: None)
    cpu_backend._loaded.cache_clear()
    try:
        assert "C++ compiler" in cpu_backend.unavailable_reason()
    finally:
        cpu_backend._loaded.cache_clear()


VECTOR_WIDTHS = {"scalar": 1, "avx2": 8, "avx512": 16}  # fp32 lanes of each tier's paths
needs_x86_64 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                  reason="the CPU tiers are x86-64 levels")


@needs_x86_64
def test_each_tier_runs_its_own_library(cpu_tier):
    """The tier in use picks the library: its flags, its file and its vector paths."""
    lib = cpu_backend.library()
    assert lib is cpu_backend.library(cpu_tier)
    assert lib.kvpage_vector_width() == VECTOR_WIDTHS[cpu_tier]
    march = {"scalar": "-march=x86-64", "avx2": "-march=x86-64-v3", "avx512": "-march=x86-64-v4"}
    assert march[cpu_tier] in cpu_backend.flags(cpu_tier)
    assert "-ffp-contract=off" in cpu_backend.flags(cpu_tier)


def test_a_library_is_never_shared_by_cpus_with_other_flags(monkeypatch):
    """The cached file's name depends on this CPU's flags: a library built on a CPU with
    AVX-512 is not the one a CPU without it looks for, nor the other way round (the flags are
    toggled, so the check holds whichever of them this CPU has)."""
    here = cpu_backend.library_path("scalar", "g++")
    flags = cpu_isa.cpu_flags()
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: flags ^ {"avx512f", "avx512bw"})
    assert cpu_backend.library_path("scalar", "g++") != here
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: flags ^ {"amx_tile"})
    assert cpu_backend.library_path("scalar", "g++") != here
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: flags)
    assert cpu_backend.library_path("scalar", "g++") == here


def test_a_tier_above_the_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_isa, "detected_isa", lambda: "avx2")
    with pytest.raises(KernelInputError, match="offers the avx2 tier, not avx512"):
        cpu_backend.library("avx512")


def test_a_cpu_without_avx2_says_the_scalar_path_runs(monkeypatch, caplog):
    monkeypatch.setattr(cpu_isa, "detected_isa", lambda: "scalar")
    cpu_backend._loaded.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=cpu_backend.logger.name):
            cpu_backend.library("scalar")
    finally:
        cpu_backend._loaded.cache_clear()
    assert [r.getMessage() for r in caplog.records if r.name == cpu_backend.logger.name] == [
        "cpu kernels: the scalar path runs (this CPU has no AVX2 and FMA): decode attention "
        "takes 2 to 4 times as long as with AVX2"]


# fp32: sums and exp in another order than torch's, within a few ulp; bf16: that may flip a
# rounding by one bf16 step, which a second rounding can widen a little.
ELEMENTWISE_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-6}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows, hidden", [(1, 576), (16, 589), (300, 576)])  # 589: a tail
def test_rms_norm_rounds_like_the_torch_ops(cpu_tier, dtype, with_residual, rows, hidden):
    gen = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, 700, generator=gen).to(dtype)
    x = wide[:, :hidden]  # rows with a stride, as a slice of a wider output
    residual = torch.randn(rows, hidden, generator=gen).to(dtype) if with_residual else None
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    expected = rms_norm(x, weight, 1e-5, residual, backend="torch")
    actual = rms_norm(x, weight, 1e-5, residual, backend="cpu")
    if with_residual:
        assert torch.equal(actual[1], expected[1])  # the sum is exact
        actual, expected = actual[0], expected[0]
    assert actual.dtype == dtype and actual.shape == (rows, hidden)
    torch.testing.assert_close(actual, expected, rtol=ELEMENTWISE_RTOL[dtype], atol=1e-6)
    if dtype == torch.bfloat16:
        assert (actual == expected).float().mean() > 0.99


def gates(rows: int, inner: int, dtype: torch.dtype) -> torch.Tensor:
    """[gate | up] rows, with extreme gates and a NaN in the first and the last lanes."""
    x = torch.randn(rows, 2 * inner, generator=torch.Generator().manual_seed(rows)) * 4
    special = torch.tensor([-100.0, 100.0, 0.0, float("nan")])
    x[0, :4] = x[0, inner - 4:inner] = special
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, inner", [(1, 1536), (16, 1541), (300, 1536)])  # 1541: a tail
def test_silu_and_mul_rounds_like_the_torch_ops(cpu_tier, dtype, rows, inner):
    x = gates(rows, inner, dtype)
    expected = silu_and_mul(x, backend="torch")
    actual = silu_and_mul(x, backend="cpu")
    assert actual.shape == (rows, inner) and actual.dtype == dtype
    torch.testing.assert_close(actual, expected, rtol=ELEMENTWISE_RTOL[dtype], atol=1e-6,
                               equal_nan=True)
    if dtype == torch.bfloat16:
        assert (actual == expected).float().mean() > 0.98


@pytest.mark.parametrize("rows, inner", [(1, 1536), (16, 1541), (300, 1536)])
def test_gelu_tanh_and_mul_is_exact_to_fp32_rounding(cpu_tier, rows, inner):
    """Against the formula in float64: a few ulps (torch's fp32 op loses up to about 1e-4
    relative in 1 + tanh(u) where tanh(u) nears -1; this one does not)."""
    x = gates(rows, inner, torch.float32)
    gate, up = x.double().chunk(2, dim=-1)
    u = math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)
    exact = 0.5 * gate * (1 + torch.tanh(u)) * up
    actual = gelu_tanh_and_mul(x, backend="cpu")
    assert actual.shape == (rows, inner) and actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), exact, rtol=4e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("rows, inner", [(1, 1536), (16, 1541), (300, 1536)])
def test_gelu_tanh_and_mul_rounds_like_the_torch_ops_in_bf16(cpu_tier, rows, inner):
    x = gates(rows, inner, torch.bfloat16)
    expected = gelu_tanh_and_mul(x, backend="torch")
    actual = gelu_tanh_and_mul(x, backend="cpu")
    torch.testing.assert_close(actual, expected, rtol=2**-6, atol=1e-5, equal_nan=True)
    # equal but for the rounding of the fp32 results (and where torch's reaches 0 first)
    assert (actual == expected)[expected.abs() > 1e-3].float().mean() > 0.95


def test_other_dtypes_and_shapes_take_the_torch_ops():
    x = torch.randn(4, 3, 64)  # 3-D: the torch ops
    weight = torch.rand(64)
    assert torch.equal(rms_norm(x, weight, 1e-6, backend="cpu"),
                       rms_norm(x, weight, 1e-6, backend="torch"))
    assert torch.equal(silu_and_mul(x, backend="cpu"), silu_and_mul(x, backend="torch"))
    assert torch.equal(gelu_tanh_and_mul(x, backend="cpu"),
                       gelu_tanh_and_mul(x, backend="torch"))
    empty = torch.zeros(0, 64, dtype=torch.bfloat16)
    assert rms_norm(empty, weight.bfloat16(), 1e-6, backend="cpu").shape == (0, 64)
    assert silu_and_mul(empty, backend="cpu").shape == (0, 32)


def test_rms_norm_and_silu_and_mul_check_their_inputs():
    with pytest.raises(KernelInputError, match="weight must be"):
        rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(KernelInputError, match="residual shape"):
        rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6, torch.randn(3, 8))
    with pytest.raises(KernelInputError, match="must be even"):
        silu_and_mul(torch.randn(2, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_copies_strided_rows_and_skips_padding(dtype):
    num_blocks, block_size, heads, dim = 6, 8, 2, 80
    k_cache = torch.randn(num_blocks, block_size, heads, dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, heads, dim).to(dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([3, -1, 47, 8, -1, 21], dtype=torch.int64)
    fused = torch.randn(6, 5, dim).to(dtype)  # k and v as views of one projection output
    k, v = fused[:, 1:3], fused[:, 3:5]
    write_kv(k, v, k_cache, v_cache, slots, backend="cpu")
    write_kv(k, v, expected_k, expected_v, slots, backend="reference")
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_write_kv_refuses_a_slot_past_the_cache_and_writes_nothing():
    k_cache = torch.zeros(2, 4, 1, 64)
    v_cache = torch.zeros_like(k_cache)
    k = torch.ones(2, 1, 64)
    with pytest.raises(KernelInputError, match=r"slot_mapping\[1\] = 8 is outside the cache"):
        write_kv(k, k, k_cache, v_cache, torch.tensor([0, 8]), backend="cpu")
    assert not k_cache.any() and not v_cache.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_rotary_embedding_is_bit_identical_to_the_torch_ops(cpu_tier, dtype, tokens):
    gen = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, 15, 64, generator=gen).to(dtype)
    x = qkv[:, :12]  # q and k heads as a view of a fused projection output
    table = torch.randn(tokens, 64, generator=gen).to(dtype)
    cos, sin = table.unsqueeze(1).chunk(2, dim=-1)  # [tokens, 1, 32] views, as the model has
    expected = rotary_embedding(x, cos, sin, backend="torch")
    actual = rotary_embedding(x, cos, sin, backend="cpu")
    assert actual.shape == (tokens, 12, 64) and torch.equal(actual, expected)
    assert torch.equal(rotary_embedding(x, cos[:, 0], sin[:, 0], backend="cpu"), expected)


def test_rotary_embedding_checks_its_inputs():
    x = torch.randn(4, 2, 8)
    with pytest.raises(KernelInputError, match="x must be"):
        rotary_embedding(torch.randn(4, 16), torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(KernelInputError, match="1 to head_dim // 2 = 3 values"):
        rotary_embedding(torch.randn(4, 2, 7), torch.randn(4, 4), torch.randn(4, 4))
    with pytest.raises(KernelInputError, match="cos and sin must hold"):
        rotary_embedding(x, torch.randn(3, 3), torch.randn(3, 3))
    with pytest.raises(KernelInputError, match="cos and sin must hold"):
        rotary_embedding(x, torch.randn(4, 3), torch.randn(4, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [1, 7, 8, 9, 15, 16, 17, 49152])
def test_argmax_finds_the_first_maximum_like_torch_max(cpu_tier, dtype, cols):
    gen = torch.Generator().manual_seed(cols)
    wide = torch.randn(9, cols + 5, generator=gen).to(dtype)
    x = wide[:, :cols]  # strided rows
    x[1, :] = 3.0  # all equal: index 0
    if cols > 2:
        x[2, cols - 1] = x[2, 1] = 99.0  # a tie: the first one
        x[3, cols // 2] = float("nan")  # a NaN counts as the maximum, as in torch.max
        x[4, :] = float("-inf")
    expected = x.max(dim=-1).indices
    assert torch.equal(argmax(x, backend="cpu"), expected)
    assert torch.equal(argmax(x, backend="torch"), expected)


def test_argmax_checks_its_input():
    with pytest.raises(KernelInputError, match="x must be"):
        argmax(torch.randn(3))
    with pytest.raises(KernelInputError, match="x must be"):
        argmax(torch.randn(3, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("num_experts, top_k", [(1, 1), (8, 2), (60, 4), (128, 8)])
def test_route_experts_picks_the_softmax_top_k_like_torch(cpu_tier, dtype, normalize,
                                                          num_experts, top_k):
    seed = num_experts * 10 + top_k
    wide = torch.randn(37, num_experts + 3, generator=torch.Generator().manual_seed(seed))
    logits = (4 * wide).to(dtype)[:, :num_experts]  # strided rows
    weights, experts = route_experts(logits, top_k, normalize, backend="cpu")
    expected_weights, _ = route_experts(logits, top_k, normalize, backend="torch")
    assert weights.dtype == torch.float32 and experts.dtype == torch.int64
    torch.testing.assert_close(weights, expected_weights, rtol=2e-6, atol=1e-7,
                               msg=lambda m: f"seed {seed}: {m}")
    # the experts are those weights' own (bf16 logits tie often: torch.topk orders ties its
    # own way), distinct, and equal weights go to the lower expert first
    probs = torch.softmax(logits.float(), dim=-1).gather(1, experts)
    if normalize:
        probs = probs / probs.sum(-1, keepdim=True)
        torch.testing.assert_close(weights.sum(-1), torch.ones(37), rtol=1e-6, atol=0)
    torch.testing.assert_close(probs, weights, rtol=2e-6, atol=1e-7)
    assert all(len(set(row)) == top_k for row in experts.tolist())
    tied = weights[:, 1:] == weights[:, :-1]
    assert (experts[:, 1:] > experts[:, :-1])[tied].all()


def test_route_experts_breaks_ties_by_the_lower_expert_and_spreads_nan(cpu_tier):
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0], [0.0, float("nan"), 5.0, 1.0]])
    weights, experts = route_experts(logits, 2, False, backend="cpu")
    # a NaN logit makes every probability of its row NaN: they tie, lowest experts first
    assert experts.tolist() == [[1, 3], [0, 1]]
    assert weights[0, 0] == weights[0, 1] and weights[1].isnan().all()


def test_route_experts_checks_its_input():
    with pytest.raises(KernelInputError, match="1 <= top_k <= num_experts"):
        route_experts(torch.randn(3, 4), 5)
    with pytest.raises(KernelInputError, match="logits must be"):
        route_experts(torch.randn(4), 1)
