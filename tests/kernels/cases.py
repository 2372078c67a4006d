"""Random problems (paged attention, low-bit weights) and tolerance checks for the kernel
tests."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch
from kvpage_kernels import QuantizedPanels, QuantizedWeight

# Tolerances per dtype, against the fp32 reference.
TOLERANCES = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
UNIT_ROUNDOFF = 2.0**-24  # of fp32
POISON = 1234.5


@dataclass
class Problem:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float
    max_seq_len: int
    max_query_len: int
    seed: int  # make_problem(..., seed=seed) makes this problem again

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                self.query_start_loc, self.scale)

    def hints(self):
        return {"max_seq_len": self.max_seq_len, "max_query_len": self.max_query_len}


def make_problem(seq_lens: list[int], q_lens: list[int], *, num_kv_heads=2, group=1,
                 head_dim=64, block_size=16, dtype=torch.float32, extra_blocks=3,
                 device="cpu", seed=None) -> Problem:
    """Blocks of each sequence are scattered at random over the pool; every slot that holds
    no token is NaN, so a read beyond a sequence's end poisons the result. Without a seed, a
    fresh one is drawn (and kept in the problem)."""
    if seed is None:
        seed = random.randrange(2**31)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    needed = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(needed) + extra_blocks
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    max_blocks = max(needed) + 1
    tables = torch.full((len(seq_lens), max_blocks), num_blocks + 7, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for i, (n, nb) in enumerate(zip(seq_lens, needed, strict=True)):
        blocks = [ids.pop() for _ in range(nb)]
        tables[i, :nb] = torch.tensor(blocks, dtype=torch.int32)
        for p in range(n):
            k_cache[blocks[p // block_size], p % block_size] = torch.randn(
                num_kv_heads, head_dim, generator=gen).to(dtype)
            v_cache[blocks[p // block_size], p % block_size] = torch.randn(
                num_kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return Problem(q.to(device), k_cache.to(device), v_cache.to(device), tables.to(device),
                   torch.tensor(seq_lens, dtype=torch.int32, device=device), starts.to(device),
                   head_dim ** -0.5, max(seq_lens), max(q_lens), seed)


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, POISON)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, context: str = "") -> None:
    """actual within the dtype's tolerance of expected; `context` (e.g. the problem's seed)
    starts every failure message."""
    assert not torch.isnan(actual).any(), f"{context}: NaN in output: an unused cache slot was read"
    assert not (actual == POISON).any(), f"{context}: some output element was never written"
    tol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol,
                               msg=lambda message: f"{context}: {message}")


def check_large_num_blocks(backend: str, device: str, dtype=torch.float16) -> None:
    """write_kv and decode attention on block ids whose element offset exceeds 2**31: the
    cache is allocated but left untouched except for the two blocks in use (NaN-filled)."""
    from kvpage_kernels import paged_attention, write_kv

    block_size, dim = 16, 64
    num_blocks = 2**31 // (block_size * dim) + 8
    k_cache = torch.empty(num_blocks, block_size, 1, dim, dtype=dtype, device=device)
    v_cache = torch.empty_like(k_cache)
    blocks = [num_blocks - 1, 2]
    for b in blocks:
        k_cache[b].fill_(float("nan"))
        v_cache[b].fill_(float("nan"))
    seq_len = 20
    slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size
                          for p in range(seq_len)], dtype=torch.int64, device=device)
    k = torch.randn(seq_len, 1, dim, device=device).to(dtype)
    v = torch.randn(seq_len, 1, dim, device=device).to(dtype)
    write_kv(k, v, k_cache, v_cache, slots, backend=backend)
    assert torch.equal(k_cache[num_blocks - 1], k[:16]) and torch.equal(v_cache[2, :4], v[16:])
    q = torch.randn(1, 2, dim, device=device).to(dtype)
    args = (q, k_cache, v_cache, torch.tensor([blocks], dtype=torch.int32, device=device),
            torch.tensor([seq_len], dtype=torch.int32, device=device),
            torch.tensor([0, 1], dtype=torch.int32, device=device), 0.125)
    expected = paged_attention(*args, backend="reference")
    assert_close(paged_attention(*args, backend=backend, out=poisoned_like(q)), expected)


def assert_close_to_product(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor,
                            weight: torch.Tensor, bias: torch.Tensor | None, seed: int) -> None:
    """fp32 tolerance of a sum of in_features products in two different orders: each result is
    within about sqrt(in_features) unit roundoffs of the exact sum, relative to the sum of the
    products' magnitudes (|x| @ |W|^T + |bias|). The bound is 4 sqrt(in_features) roundoffs
    (the worst output of either tier measured a quarter of one), while one product too many or
    too few is over a hundred times the bound for these sizes."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape, f"seed {seed}"
    magnitude = x.abs() @ weight.float().abs().T
    if bias is not None:
        magnitude += bias.abs()
    bound = 4 * x.shape[1] ** 0.5 * UNIT_ROUNDOFF * magnitude
    excess = ((actual - expected).abs() - bound).max() if actual.numel() else 0.0
    assert excess <= 0, f"seed {seed}: an output is off by {float(excess):.3g} past its bound"


def random_quantized(out_features: int, in_features: int, bits: int, group_size: int,
                     ordered: bool, gen: torch.Generator) -> QuantizedWeight:
    """Random codes; scales and offsets are fp16 values, as in checkpoints, so that every
    q * scale is exact in fp32; ``ordered`` adds a random input order (GPTQ act-order)."""
    groups = (out_features, in_features // group_size)
    codes = torch.randint(0, 2**bits, (out_features, in_features), dtype=torch.uint8,
                          generator=gen)
    scales = (0.01 + 0.1 * torch.rand(groups, generator=gen)).half().float()
    offsets = (-(2 ** (bits - 1)) * scales + 0.01 * torch.randn(groups, generator=gen)).half()
    order = torch.randperm(in_features, generator=gen) if ordered else None
    return QuantizedWeight(codes, scales, offsets.float(), bits, group_size, order)


def in_fp32_groups(packed: QuantizedPanels) -> QuantizedPanels:
    """The packed weight with its scales and offsets in fp32, as packing keeps them where fp16
    cannot hold them all."""
    return dataclasses.replace(packed, scales=packed.scales.float(),
                               offsets=packed.offsets.float())


def random_low_bit_problem(rows: int, in_features: int, out_features: int, bits: int,
                           group_size: int, ordered: bool, bias: bool):
    """(x, quantized weight, bias, seed) drawn from a fresh seed (printed by failing checks)."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    weight = random_quantized(out_features, in_features, bits, group_size, ordered, gen)
    x = torch.randn(rows, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    return x, weight, b, seed
