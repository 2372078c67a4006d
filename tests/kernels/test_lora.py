"""lora_shrink and lora_expand (multi-LoRA: each row of a batch through its own adapter slot,
-1 for none) on every backend against the reference, on fresh random inputs each run (the seed
is in every failure message): torch, cpu on every CPU tier this CPU offers, and triton on the
GPU or, without one, in the Triton interpreter (tiny shapes there: milliseconds a program)."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import random
from dataclasses import dataclass

import pytest
import torch
from kvpage_kernels import KernelInputError, cpu_backend, layer_ops, lora_expand, lora_shrink

from .cases import UNIT_ROUNDOFF

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_SLOTS = 4
ROWS = [0, 1, 5, 64, 300]
RANKS = [1, 8, 16, 64]
FEATURES = [(100, 1000), (576, 100), (1000, 576)]  # (in, out)
# every (rows, rank), with the features taking turns
SHAPES = [(rows, rank, *FEATURES[i % len(FEATURES)])
          for i, (rows, rank) in enumerate(itertools.product(ROWS, RANKS))]
DTYPES = [torch.float32, torch.bfloat16]
# out's relative spacing: one unit in the last place of a value is at most this times it
OUT_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}

needs_cpu = pytest.mark.skipif(cpu_backend.unavailable_reason() is not None,
                               reason=f"no cpu backend: {cpu_backend.unavailable_reason()}")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")
interpreted_bf16 = pytest.mark.skipif(
    DEVICE == "cpu", reason="the Triton interpreter's bf16 dot and rounding are not a GPU's")


@dataclass
class LoraProblem:
    x: torch.Tensor      # [rows, in_features]
    a: torch.Tensor      # [NUM_SLOTS, rank, in_features]
    b: torch.Tensor      # [NUM_SLOTS, out_features, rank]
    slots: torch.Tensor  # int32 [rows]
    out: torch.Tensor    # [rows, out_features]: lora_expand's prior values
    seed: int


def random_problem(rows: int, rank: int, in_features: int, out_features: int,
                   dtype: torch.dtype, slots: str = "mixed", device: str = "cpu",
                   seed: int | None = None) -> LoraProblem:
    """Inputs drawn from `seed` (a fresh one if None: a failure's seed replays it); slots
    "mixed" (each row -1 or any slot), "none" (all -1) or "one" (all the last slot)."""
    seed = random.randrange(2**31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen)
    a = torch.randn(NUM_SLOTS, rank, in_features, generator=gen) / in_features**0.5
    b = torch.randn(NUM_SLOTS, out_features, rank, generator=gen) / rank**0.5
    out = torch.randn(rows, out_features, generator=gen)
    token_slots = {"mixed": torch.randint(-1, NUM_SLOTS, (rows,), generator=gen),
                   "none": torch.full((rows,), -1), "one": torch.full((rows,), NUM_SLOTS - 1)}
    return LoraProblem(*(t.to(device, dtype) for t in (x, a, b)),
                       token_slots[slots].to(device, torch.int32), out.to(device, dtype), seed)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor,
                  terms: int, seed: int, ulp: float = 0.0) -> None:
    """The tolerance of two fp32 sums of `terms` products in different orders, as
    ``cases.assert_close_to_product`` states it (4 sqrt(terms) unit roundoffs of the products'
    magnitudes), plus `ulp` times |expected| for a final rounding to a narrower dtype (the two
    sums may round to neighbouring values)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, f"seed {seed}"
    actual, expected, magnitude = actual.float().cpu(), expected.float().cpu(), magnitude.cpu()
    bound = 4 * max(terms, 1) ** 0.5 * UNIT_ROUNDOFF * magnitude + ulp * expected.abs()
    excess = ((actual - expected).abs() - bound).max() if actual.numel() else 0.0
    assert excess <= 0, f"seed {seed}: an output is off by {float(excess):.3g} past its bound"


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (NaN payloads and signed zeros included), for exact comparisons."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def expand_magnitude(prior: torch.Tensor, h: torch.Tensor, b: torch.Tensor,
                     slots: torch.Tensor) -> torch.Tensor:
    """|prior| + |h| @ |B_s|^T of each row: the magnitudes lora_expand sums."""
    magnitude = prior.float().abs()
    layer_ops.lora_expand(magnitude, h.abs(), b.float().abs(), slots)
    return magnitude


@dataclass
class Expected:
    """A problem with the reference's results and the magnitudes of their sums."""
    problem: LoraProblem
    h: torch.Tensor
    h_magnitude: torch.Tensor
    prior: torch.Tensor  # out before lora_expand: p.out, NaN in the first row without adapter
    out: torch.Tensor
    out_magnitude: torch.Tensor


@functools.cache
def expected(rows: int, rank: int, in_features: int, out_features: int, dtype: torch.dtype,
             slots: str = "mixed", device: str = "cpu") -> Expected:
    """The reference on a random problem of this shape, its seed drawn at the first call of a
    run; the backends' tests of one shape share it (the reference is a loop over rows)."""
    p = random_problem(rows, rank, in_features, out_features, dtype, slots, device)
    h = lora_shrink(p.x, p.a, p.slots, backend="reference")
    prior = p.out.clone()
    if (p.slots < 0).any():
        prior[torch.nonzero(p.slots < 0)[0, 0], 0] = float("nan")
    out = lora_expand(prior.clone(), h, p.b, p.slots, backend="reference")
    return Expected(p, h, layer_ops.lora_shrink(p.x.abs(), p.a.abs(), p.slots), prior, out,
                    expand_magnitude(prior, h, p.b, p.slots))


def check_shrink(e: Expected, backend: str) -> None:
    """h within the fp32 tolerance of in_features products of the reference; exact zeros
    where the slot is -1."""
    p = e.problem
    actual = lora_shrink(p.x, p.a, p.slots, backend=backend)
    assert_within(actual, e.h, e.h_magnitude, p.x.shape[1], p.seed)
    assert not actual[p.slots < 0].any(), f"seed {p.seed}: a row without adapter is not 0"


def check_expand(e: Expected, backend: str) -> None:
    """out (prior value counted like a bias) within the fp32 tolerance of rank products plus
    one unit in the last place of its dtype, on the reference's h; rows whose slot is -1 keep
    their very bits (one of them a NaN, which no kernel may touch)."""
    p = e.problem
    actual = e.prior.clone()
    assert lora_expand(actual, e.h, p.b, p.slots, backend=backend) is actual, f"seed {p.seed}"
    adapted = p.slots >= 0
    assert_within(actual[adapted], e.out[adapted], e.out_magnitude[adapted], e.h.shape[1],
                  p.seed, OUT_ULP[p.out.dtype])
    assert torch.equal(bits(actual[~adapted]), bits(e.prior[~adapted])), \
        f"seed {p.seed}: a row without adapter changed"


def check(e: Expected, backend: str) -> None:
    check_shrink(e, backend)
    check_expand(e, backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, rank, in_features, out_features", SHAPES)
def test_torch_matches_the_reference(rows, rank, in_features, out_features, dtype):
    check(expected(rows, rank, in_features, out_features, dtype), "torch")


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, rank, in_features, out_features", SHAPES)
def test_cpu_matches_the_reference(cpu_tier, rows, rank, in_features, out_features, dtype):
    check(expected(rows, rank, in_features, out_features, dtype), "cpu")


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("slots", ["none", "one"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batches_without_adapters_or_with_one(backend, slots, dtype):
    """All rows -1 (nothing to do: zeros, out untouched) or all through one slot."""
    check(expected(64, 16, 576, 1000, dtype, slots), backend)


@needs_cpu
def test_cpu_serves_fp32_and_bf16_itself(cpu_tier, monkeypatch):
    """fp32 and bf16 run in the compiled kernels (the torch ops would fail here); fp16 goes to
    the torch ops, as in the rest of the cpu backend."""
    def fail(*args):
        raise AssertionError("the cpu backend fell back to layer_ops")

    for dtype in DTYPES:
        p = random_problem(5, 8, 100, 70, dtype)
        monkeypatch.setattr(layer_ops, "lora_shrink", fail)
        monkeypatch.setattr(layer_ops, "lora_expand", fail)
        lora_expand(p.out, lora_shrink(p.x, p.a, p.slots, backend="cpu"), p.b, p.slots,
                    backend="cpu")
        monkeypatch.undo()
    check(expected(5, 8, 100, 70, torch.float16), "cpu")


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_does_not_depend_on_its_batch(cpu_tier, dtype):
    """Each output is computed by the same instructions whatever the batch: a row alone, or the
    batch in another order, gives the very same bits."""
    p = random_problem(65, 16, 1000, 576, dtype)
    h = lora_shrink(p.x, p.a, p.slots, backend="cpu")
    out = lora_expand(p.out.clone(), h, p.b, p.slots, backend="cpu")
    for row in (0, 13, 64):
        one = slice(row, row + 1)
        assert torch.equal(lora_shrink(p.x[one], p.a, p.slots[one], backend="cpu"), h[one]), \
            f"seed {p.seed}: row {row} of h"
        alone = lora_expand(p.out[one].clone(), h[one], p.b, p.slots[one], backend="cpu")
        assert torch.equal(bits(alone), bits(out[one])), f"seed {p.seed}: row {row} of out"
    order = torch.randperm(65, generator=torch.Generator().manual_seed(p.seed))
    slots = p.slots[order]
    assert torch.equal(lora_shrink(p.x[order], p.a, slots, backend="cpu"), h[order]), \
        f"seed {p.seed}: h of the permuted batch"
    permuted = lora_expand(p.out[order].clone(), h[order], p.b, slots, backend="cpu")
    assert torch.equal(bits(permuted), bits(out[order])), f"seed {p.seed}: permuted out"


def check_strided(backend: str, dtype: torch.dtype, device: str) -> None:
    """x a column slice of a wider tensor, the weights transposed views, h a column slice, out a
    column slice written in place (its neighbouring columns untouched)."""
    p = random_problem(5, 8, 100, 70, dtype, device=device)
    wide_x = torch.zeros(5, 130, dtype=dtype, device=device)
    wide_x[:, 10:110] = p.x
    a_t, b_t = p.a.transpose(1, 2).contiguous(), p.b.transpose(1, 2).contiguous()
    x, a, b = wide_x[:, 10:110], a_t.transpose(1, 2), b_t.transpose(1, 2)
    h = lora_shrink(x, a, p.slots, backend=backend)
    expected_h = lora_shrink(p.x, p.a, p.slots, backend="reference")
    magnitude = layer_ops.lora_shrink(p.x.abs(), p.a.abs(), p.slots)
    assert_within(h, expected_h, magnitude, 100, p.seed)
    wide_h = torch.zeros(5, 20, device=device)
    wide_h[:, 3:11] = expected_h
    wide_out = torch.randn(5, 90, device=device).to(dtype)
    before = wide_out.clone()
    lora_expand(wide_out[:, 7:77], wide_h[:, 3:11], b, p.slots, backend=backend)
    expected = lora_expand(before[:, 7:77].clone(), expected_h, p.b, p.slots, backend="reference")
    magnitude = expand_magnitude(before[:, 7:77], expected_h, p.b, p.slots)
    assert_within(wide_out[:, 7:77], expected, magnitude, 8, p.seed, OUT_ULP[dtype])
    outside = torch.ones(90, dtype=torch.bool, device=device)
    outside[7:77] = False
    assert torch.equal(wide_out[:, outside], before[:, outside]), f"seed {p.seed}"


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_strided_inputs_and_out_slice(cpu_tier, dtype):
    check_strided("cpu", dtype, "cpu")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=interpreted_bf16)])
@pytest.mark.parametrize("rows, rank, in_features, out_features, slots", [
    (0, 8, 40, 24, "mixed"),
    (1, 1, 100, 70, "mixed"),
    (5, 16, 100, 70, "mixed"),
    (3, 64, 40, 300, "mixed"),  # ranks in four program tiles
    (4, 8, 33, 20, "none"),
    (4, 8, 33, 20, "one"),
])
def test_triton_matches_the_reference(rows, rank, in_features, out_features, slots, dtype):
    check(expected(rows, rank, in_features, out_features, dtype, slots, DEVICE), "triton")


@needs_triton
def test_triton_strided_inputs_and_out_slice():
    check_strided("triton", torch.float32, DEVICE)


def test_bad_arguments_are_named():
    p = random_problem(5, 8, 100, 70, torch.float32)
    h = lora_shrink(p.x, p.a, p.slots)
    with pytest.raises(KernelInputError, match=r"token_slots must lie in \[-1, 4\).*got \[-1, 4\]"):
        lora_shrink(p.x, p.a, torch.tensor([0, 4, -1, 1, 2], dtype=torch.int32))
    with pytest.raises(KernelInputError, match=r"token_slots must lie in \[-1, 4\).*got \[-2, "):
        lora_expand(p.out, h, p.b, torch.tensor([0, -2, 1, 1, 2], dtype=torch.int32))
    with pytest.raises(KernelInputError, match=r"token_slots must be int32 \[5\].*torch.int64"):
        lora_shrink(p.x, p.a, p.slots.long())
    with pytest.raises(KernelInputError, match=r"token_slots must be int32 \[5\].*\(4,\)"):
        lora_expand(p.out, h, p.b, p.slots[:4])
    with pytest.raises(KernelInputError, match=r"x must be \[tokens, in_features\] fp32, bf16 or "
                       r"fp16, got torch.float64"):
        lora_shrink(p.x.double(), p.a.double(), p.slots)
    with pytest.raises(KernelInputError, match=r"lora_a must be \[num_slots, rank, 100\] in x's "
                       r"dtype torch.bfloat16, got torch.float32"):
        lora_shrink(p.x.bfloat16(), p.a, p.slots)
    with pytest.raises(KernelInputError, match=r"lora_a must be \[num_slots, rank, 100\].*"
                       r"\(4, 8, 99\)"):
        lora_shrink(p.x, p.a[:, :, :99], p.slots)
    with pytest.raises(KernelInputError, match=r"out must be \[tokens, out_features\].*unit "
                       r"stride"):
        lora_expand(p.out.T.contiguous().T, h, p.b, p.slots)
    with pytest.raises(KernelInputError, match=r"h must be fp32 \[5, rank\], got torch.bfloat16"):
        lora_expand(p.out, h.bfloat16(), p.b, p.slots)
    with pytest.raises(KernelInputError, match=r"lora_b must be \[num_slots, 70, 8\] in out's "
                       r"dtype torch.float32, got torch.float32 \(4, 70, 7\)"):
        lora_expand(p.out, h, p.b[:, :, :7], p.slots)
    with pytest.raises(KernelInputError, match=r"lora_b must be .* in out's dtype "
                       r"torch.bfloat16, got torch.float32"):
        lora_expand(p.out.bfloat16(), h, p.b, p.slots)


@needs_cpu
def test_the_cpu_kernels_check_the_slots_themselves():
    """Called directly (no ops checks), a slot past the weights is refused, not read."""
    p = random_problem(5, 8, 100, 70, torch.float32)
    bad = torch.tensor([0, 1, 4, -1, 2], dtype=torch.int32)
    with pytest.raises(KernelInputError, match=r"token_slots\[2\] = 4 lies outside \[-1, 4\)"):
        cpu_backend.lora_shrink(p.x, p.a, bad)
    before = p.out.clone()
    with pytest.raises(KernelInputError, match=r"token_slots\[2\] = 4 lies outside \[-1, 4\)"):
        cpu_backend.lora_expand(p.out, torch.ones(5, 8), p.b, bad)
    assert torch.equal(p.out, before)
