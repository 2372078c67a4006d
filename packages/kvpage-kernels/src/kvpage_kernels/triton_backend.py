"""Triton backend: write_kv, unified paged attention, split-KV decode, copy_blocks, and
packed_linear on low-bit weights.

The attention kernels walk the keys of a sequence in tiles of TILE_N positions, looking each
position's block up in the block table, so one kernel serves every cache block size. They
use an online softmax in fp32; fp32 inputs are multiplied at full precision, 16-bit ones
with 16-bit dots summed in fp32 (``_attention_precision``).
All pointer offsets into the cache are computed in int64.

packed_linear on ``QuantizedPanels`` reads the panels that ``pack_weight`` makes (the cpu
backend's layout) tile by tile: each program loads a [BLOCK_K, BLOCK_N] tile of codes as
their 32-bit words, unpacks them in registers (shift and mask), dequantizes them
(``q * scale + offset`` in fp32, rounded to x's dtype) and multiplies them into an fp32
accumulator with ``tl.dot``: full fp32 precision for fp32 x, tensor-core dots for bf16/fp16
x; the rows of x are read in the weight's input order. Tiles are at least 16 wide in every
dimension (padded and masked), as GPUs need, and a decode step's few rows split the inputs
among programs (split-K, ``choose_linear_splits``) so that the GPU fills; the partial sums
are added in a fixed order. fp32 and bf16 ``PackedWeight`` go to the torch path.

lora_shrink and lora_expand (multi-LoRA: each row through its own adapter slot) are BGMV
kernels: a program per (row, tile of ranks or of outputs) reads its row's slot and, for slot
-1, stores zeros (shrink) or returns at once (expand). Ranks are too few for ``tl.dot``'s
16-wide tiles, so the products are summed in fp32 registers (elementwise products, then
``tl.sum``); the adapter's rows are read along their contiguous dimension.

On a machine with no GPU these kernels run under TRITON_INTERPRET=1 (set before this module
is imported) on CPU tensors.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import layer_ops
from ._common import check_inner_contiguous, pairs_to_tensors, swap_blocks_indexed
from .packed_weight import PANEL_WIDTH, QuantizedPanels
from .quantized import int8_rounded

swap_blocks = swap_blocks_indexed
# Keys per attention step, independent of the cache block size (each position's block is
# looked up on its own). Split-KV decode: each program covers PARTITION_SIZE key positions
# (a multiple of TILE_N) of one sequence.
TILE_N = 32
PARTITION_SIZE = 512
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
                     stride_c_slot, stride_c_head,
                     HEAD_DIM: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                     BLOCK: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        head = offs // HEAD_DIM
        dim = offs % HEAD_DIM
        mask = offs < NUM_KV_HEADS * HEAD_DIM
        dst = slot * stride_c_slot + head * stride_c_head + dim
        key = tl.load(k_ptr + tok * stride_k_tok + head * stride_k_head + dim, mask=mask)
        tl.store(k_cache_ptr + dst, key, mask=mask)
        value = tl.load(v_ptr + tok * stride_v_tok + head * stride_v_head + dim, mask=mask)
        tl.store(v_cache_ptr + dst, value, mask=mask)


@triton.jit
def _attend_range(q, q_pos, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, key_lo, key_hi,
                  scale, softcap, window,
                  stride_c_block, stride_c_slot, stride_c_head,
                  BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr,
                  USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax attention of q [BLOCK_M, HEAD_PAD] (rows at positions q_pos) over key
    positions [key_lo, key_hi). Returns the running max, sum and unnormalized output."""
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    for tile in range((key_lo // TILE_N) * TILE_N, key_hi, TILE_N):
        k_pos = tile + tl.arange(0, TILE_N)
        k_ok = (k_pos >= key_lo) & (k_pos < key_hi)
        block = tl.load(table_ptr + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        base = block * stride_c_block + (k_pos % BLOCK_SIZE) * stride_c_slot
        base += kv_head * stride_c_head
        load_ok = k_ok[:, None] & dim_ok[None, :]
        keys = tl.load(k_cache_ptr + base[:, None] + dims[None, :], mask=load_ok, other=0.0)
        if PRECISION == "native":
            scores = tl.dot(q, tl.trans(keys)) * scale
        else:
            scores = tl.dot(q.to(tl.float32), tl.trans(keys.to(tl.float32)),
                            input_precision=PRECISION) * scale
        if USE_SOFTCAP:
            scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
        allowed = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        values = tl.load(v_cache_ptr + base[:, None] + dims[None, :], mask=load_ok, other=0.0)
        if PRECISION == "native":
            acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, values.to(tl.float32),
                                                input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _load_queries(q_ptr, first_row, rows, heads, row_ok, stride_q_tok, stride_q_head,
                  HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    dims = tl.arange(0, HEAD_PAD)
    offs = (first_row + rows).to(tl.int64)[:, None] * stride_q_tok
    offs += heads[:, None] * stride_q_head + dims[None, :]
    mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)
    return tl.load(q_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _unified_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, seq_lens_ptr,
                    starts_ptr, scale, softcap, window,
                    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_table,
                    stride_c_block, stride_c_slot, stride_c_head,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Program (seq, kv head, query tile): BLOCK_Q query tokens x GROUP query heads."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_tile = tl.program_id(2)
    q_start = tl.load(starts_ptr + seq)
    q_len = tl.load(starts_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
        tok = q_tile * BLOCK_Q + rows // GROUP_PAD
        member = rows % GROUP_PAD
        heads = kv_head * GROUP + member
        row_ok = (tok < q_len) & (member < GROUP)
        q_pos = seq_len - q_len + tok
        q = _load_queries(q_ptr, q_start, tok, heads, row_ok, stride_q_tok, stride_q_head,
                          HEAD_DIM, HEAD_PAD)
        key_hi = tl.minimum(seq_len, seq_len - q_len + (q_tile + 1) * BLOCK_Q)
        key_lo = 0
        if USE_WINDOW:
            key_lo = tl.maximum(0, seq_len - q_len + q_tile * BLOCK_Q - window + 1)
        m_i, l_i, acc = _attend_range(
            q, q_pos, k_cache_ptr, v_cache_ptr, tables_ptr + seq.to(tl.int64) * stride_table,
            kv_head, key_lo, key_hi, scale, softcap, window,
            stride_c_block, stride_c_slot, stride_c_head, BLOCK_Q * GROUP_PAD, HEAD_DIM,
            HEAD_PAD, BLOCK_SIZE, TILE_N, USE_WINDOW, USE_SOFTCAP, PRECISION)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        dims = tl.arange(0, HEAD_PAD)
        offs = (q_start + tok).to(tl.int64)[:, None] * stride_o_tok
        offs += heads[:, None] * stride_o_head + dims[None, :]
        mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, part_out_ptr, part_max_ptr,
                         part_sum_ptr, tables_ptr, seq_lens_ptr, scale, softcap, window,
                         stride_q_tok, stride_q_head, stride_table,
                         stride_c_block, stride_c_slot, stride_c_head,
                         NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         PARTITION: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
                         USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Program (seq, kv head, split) of a decode batch (one query token per sequence):
    partial softmax state over key positions [split*PARTITION, (split+1)*PARTITION)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    q = _load_queries(q_ptr, seq, rows * 0, heads, row_ok, stride_q_tok, stride_q_head,
                      HEAD_DIM, HEAD_PAD)
    q_pos = tl.zeros([BLOCK_M], tl.int32) + seq_len - 1
    key_lo = split * PARTITION
    if USE_WINDOW:
        key_lo = tl.maximum(key_lo, seq_len - window)
    key_hi = tl.minimum(seq_len, (split + 1) * PARTITION)
    m_i, l_i, acc = _attend_range(
        q, q_pos, k_cache_ptr, v_cache_ptr, tables_ptr + seq.to(tl.int64) * stride_table,
        kv_head, key_lo, key_hi, scale, softcap, window,
        stride_c_block, stride_c_slot, stride_c_head, BLOCK_M, HEAD_DIM, HEAD_PAD,
        BLOCK_SIZE, TILE_N, USE_WINDOW, USE_SOFTCAP, PRECISION)
    state = (seq.to(tl.int64) * NUM_HEADS + heads) * NUM_SPLITS + split
    tl.store(part_max_ptr + state, m_i, mask=row_ok)
    tl.store(part_sum_ptr + state, l_i, mask=row_ok)
    dims = tl.arange(0, HEAD_PAD)
    mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)
    tl.store(part_out_ptr + state[:, None] * HEAD_DIM + dims[None, :], acc, mask=mask)


@triton.jit
def _split_reduce_kernel(part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr,
                         stride_o_tok, stride_o_head,
                         NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_PAD: tl.constexpr):
    """Program (seq, head): merges the NUM_SPLITS partial states into the output row."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    state = (seq * NUM_HEADS + head) * NUM_SPLITS + splits
    maxes = tl.load(part_max_ptr + state, mask=split_ok, other=float("-inf"))
    sums = tl.load(part_sum_ptr + state, mask=split_ok, other=0.0)
    top = tl.max(maxes, axis=0)
    weights = tl.where(maxes == float("-inf"), 0.0, tl.exp(maxes - top))
    dims = tl.arange(0, HEAD_PAD)
    mask = split_ok[:, None] & (dims[None, :] < HEAD_DIM)
    parts = tl.load(part_out_ptr + state[:, None] * HEAD_DIM + dims[None, :], mask=mask,
                    other=0.0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
    tl.store(out_ptr + seq * stride_o_tok + head * stride_o_head + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@triton.jit
def _copy_blocks_kernel(cache_ptr, pairs_ptr, block_numel, BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    src = tl.load(pairs_ptr + 2 * pair).to(tl.int64)
    dst = tl.load(pairs_ptr + 2 * pair + 1).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    data = tl.load(cache_ptr + src * block_numel + offs, mask=mask)
    tl.store(cache_ptr + dst * block_numel + offs, data, mask=mask)


@triton.jit
def _quantized_linear_kernel(x_ptr, codes_ptr, scales_ptr, offsets_ptr, order_ptr, out_ptr,
                             rows, n, depth, stride_x, split_depth,
                             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                             PANEL: tl.constexpr, HAS_ORDER: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, TILE_IN_GROUP: tl.constexpr,
                             PRECISION: tl.constexpr):
    """Program (row tile, column tile, split): the partial sum of x @ W^T over the inputs
    [split * split_depth, (split + 1) * split_depth), into out[split]. Each tile of codes is
    loaded once, a word per PER_WORD inputs, and unpacked in registers; the weights are
    dequantized in fp32 and rounded to x's dtype (a no-op for fp32 x) for the dot. Where a
    tile of inputs lies in one group (TILE_IN_GROUP) its scales and offsets are one row."""
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    row_ok, col_ok = row < rows, col < n
    panel = (col // PANEL).to(tl.int64)
    codes_base = panel * (depth // PER_WORD * PANEL) + col % PANEL  # word 0 of each column
    groups_base = panel * (depth // GROUP_SIZE * PANEL) + col % PANEL
    shifts = tl.arange(0, PER_WORD) * BITS
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    begin = split * split_depth
    for first in range(begin, tl.minimum(begin + split_depth, depth), BLOCK_K):
        k = first + tl.arange(0, BLOCK_K)
        k_ok = k < depth
        source = tl.load(order_ptr + k, mask=k_ok, other=0) if HAS_ORDER else k
        x = tl.load(x_ptr + row.to(tl.int64)[:, None] * stride_x + source[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        word = first // PER_WORD + tl.arange(0, WORDS)
        word_ok = (word < depth // PER_WORD)[:, None] & col_ok[None, :]
        words = tl.load(codes_ptr + codes_base[None, :] + (word * PANEL)[:, None],
                        mask=word_ok, other=0)
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
        if TILE_IN_GROUP:
            at = (groups_base + first // GROUP_SIZE * PANEL)[None, :]
            tile_ok = col_ok[None, :]
        else:
            at = groups_base[None, :] + (k // GROUP_SIZE * PANEL)[:, None]
            tile_ok = k_ok[:, None] & col_ok[None, :]
        scales = tl.load(scales_ptr + at, mask=tile_ok, other=0.0).to(tl.float32)
        offsets = tl.load(offsets_ptr + at, mask=tile_ok, other=0.0).to(tl.float32)
        weights = (codes.to(tl.float32) * scales + offsets).to(x.dtype)
        acc += tl.dot(x, weights, input_precision=PRECISION)
    out = out_ptr + split.to(tl.int64) * rows * n
    tl.store(out + row.to(tl.int64)[:, None] * n + col[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, rank, depth, stride_x, stride_a_slot,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row, rank tile): h[row, ranks] = a[slot, ranks] @ x[row], summed in fp32 over
    tiles of BLOCK_K inputs (one partial sum per rank and input lane, reduced at the end);
    zeros when the row's slot is -1."""
    row = tl.program_id(0).to(tl.int64)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    slot = tl.load(slots_ptr + row).to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    if slot >= 0:
        a_rows = a_ptr + slot * stride_a_slot + ranks.to(tl.int64)[:, None] * depth
        for first in range(0, depth, BLOCK_K):
            k = first + tl.arange(0, BLOCK_K)
            k_ok = k < depth
            x = tl.load(x_ptr + row * stride_x + k, mask=k_ok, other=0.0)
            a = tl.load(a_rows + k[None, :], mask=rank_ok[:, None] & k_ok[None, :], other=0.0)
            acc += a.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(h_ptr + row * rank + ranks, tl.sum(acc, axis=1), mask=rank_ok)


@triton.jit
def _lora_expand_kernel(out_ptr, h_ptr, b_ptr, slots_ptr, n, rank, stride_out, stride_b_slot,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (row, output tile): out[row, cols] += b[slot, cols] @ h[row], summed in fp32,
    added to out in fp32 and rounded once to out's dtype; nothing when the row's slot is -1.
    The [BLOCK_N, BLOCK_R] tile of b is one contiguous run when BLOCK_R covers the rank."""
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot >= 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        b_rows = b_ptr + slot * stride_b_slot + cols.to(tl.int64)[:, None] * rank
        acc = tl.zeros([BLOCK_N], tl.float32)
        for first in range(0, rank, BLOCK_R):
            r = first + tl.arange(0, BLOCK_R)
            r_ok = r < rank
            h = tl.load(h_ptr + row * rank + r, mask=r_ok, other=0.0)
            b = tl.load(b_rows + r[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
            acc += tl.sum(b.to(tl.float32) * h[None, :], axis=1)
        dst = out_ptr + row * stride_out + cols
        prior = tl.load(dst, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(dst, (prior + acc).to(out_ptr.dtype.element_ty), mask=col_ok)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    check_inner_contiguous(k, "k")
    check_inner_contiguous(v, "v")
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), k_cache.stride(1), k_cache.stride(2), HEAD_DIM=head_dim,
        NUM_KV_HEADS=num_kv_heads, BLOCK=triton.next_power_of_2(num_kv_heads * head_dim))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      partition: int = PARTITION_SIZE) -> int:
    """Split-KV decode pays off when there are too few (seq, kv head) programs to fill the
    GPU and the contexts are long: split each context so that about 2 programs per SM run."""
    programs = num_seqs * num_kv_heads
    max_splits = triton.cdiv(max_seq_len, partition)
    if max_splits <= 1 or programs >= 2 * num_sms:
        return 1
    return min(max_splits, triton.cdiv(2 * num_sms, programs))


def _attention_precision(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> str:
    """How the attention kernels multiply: "ieee" fp32 dots for fp32; "native" 16-bit dots
    summed in fp32 (the probabilities rounded to the cache's dtype for P @ V, as flash
    attention does) when q and the cache share a 16-bit dtype; else operands cast to fp32 at
    tf32 precision (exact for 16-bit values). The interpreter's bf16 dots are not a GPU's, so
    bf16 takes the cast there."""
    if q_dtype == torch.float32:
        return "ieee"
    if q_dtype == cache_dtype and (q_dtype == torch.float16 or not INTERPRETED):
        return "native"
    return "tf32"


def _common_meta(q, k_cache, sliding_window, softcap) -> dict:
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    return dict(HEAD_DIM=head_dim, HEAD_PAD=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_SIZE=k_cache.shape[1], TILE_N=TILE_N,
                USE_WINDOW=sliding_window is not None, USE_SOFTCAP=softcap is not None,
                PRECISION=_attention_precision(q.dtype, k_cache.dtype),
                GROUP=q.shape[1] // num_kv_heads)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, *,
                    sliding_window=None, softcap=None, max_seq_len=None, max_query_len=None,
                    out, num_splits: int | None = None,
                    partition: int = PARTITION_SIZE) -> torch.Tensor:
    """num_splits and partition override the automatic split-KV choice."""
    num_seqs = block_tables.shape[0]
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    check_inner_contiguous(q, "q")
    check_inner_contiguous(out, "out")
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    query_start_loc = query_start_loc.contiguous()
    if max_query_len is None:
        max_query_len = int(query_start_loc.diff().max())
    decode_only = max_query_len == 1 and q.shape[0] == num_seqs
    if num_splits is None:
        num_splits = 1
        if decode_only and q.is_cuda:
            if max_seq_len is None:
                max_seq_len = int(seq_lens.max())
            num_splits = choose_num_splits(num_seqs, k_cache.shape[2], max_seq_len,
                                           _num_sms(q.device.index or 0), partition)
    meta = _common_meta(q, k_cache, sliding_window, softcap)
    scalars = (scale, 1.0 if softcap is None else softcap, sliding_window or 0)
    if decode_only and num_splits > 1:
        _split_decode(q, k_cache, v_cache, block_tables, seq_lens, scalars, out, num_splits,
                      partition, meta)
        return out
    group_pad = triton.next_power_of_2(meta["GROUP"])
    # query rows per program: 16 (the smallest dot) for decode, 64 for prefill (32 for the
    # widest heads, to keep the fp32 query and accumulator tiles in registers)
    rows = 16 if max_query_len == 1 else (64 if meta["HEAD_PAD"] <= 128 else 32)
    block_q = max(1, rows // group_pad)
    grid = (num_seqs, k_cache.shape[2], triton.cdiv(max_query_len, block_q))
    _unified_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, *scalars,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP_PAD=group_pad, BLOCK_Q=block_q, **meta)
    return out


def _split_decode(q, k_cache, v_cache, block_tables, seq_lens, scalars, out, num_splits: int,
                  partition: int, meta: dict) -> None:
    num_seqs, num_heads, head_dim = q.shape
    state = dict(device=q.device, dtype=torch.float32)
    part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, **state)
    part_max = torch.empty(num_seqs, num_heads, num_splits, **state)
    part_sum = torch.empty(num_seqs, num_heads, num_splits, **state)
    grid = (num_seqs, k_cache.shape[2], num_splits)
    _split_decode_kernel[grid](
        q, k_cache, v_cache, part_out, part_max, part_sum, block_tables, seq_lens, *scalars,
        q.stride(0), q.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits, PARTITION=partition,
        BLOCK_M=max(16, triton.next_power_of_2(meta["GROUP"])), **meta)
    _split_reduce_kernel[(num_seqs, num_heads)](
        part_out, part_max, part_sum, out, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
        HEAD_PAD=meta["HEAD_PAD"])


def copy_blocks(kv_caches, src_dst) -> None:
    if not kv_caches:
        return
    src, dst = pairs_to_tensors(src_dst, kv_caches[0][0].device)
    if src.numel() == 0:
        return
    pairs = torch.stack([src, dst], dim=1).contiguous()
    block_numel = kv_caches[0][0][0].numel()
    block = min(4096, triton.next_power_of_2(block_numel))
    grid = (pairs.shape[0], triton.cdiv(block_numel, block))
    for k_cache, v_cache in kv_caches:
        _copy_blocks_kernel[grid](k_cache, pairs, block_numel, BLOCK=block)
        _copy_blocks_kernel[grid](v_cache, pairs, block_numel, BLOCK=block)


def choose_linear_splits(row_tiles: int, col_tiles: int, depth_tiles: int,
                         num_sms: int) -> int:
    """Split-K for the low-bit GEMM: a decode step's few rows give too few (row, column)
    tiles to fill the GPU, so the inputs are split until about 4 programs per SM run (each
    split keeping at least 4 tiles of inputs)."""
    programs = row_tiles * col_tiles
    if programs >= 4 * num_sms:
        return 1
    return max(1, min(triton.cdiv(4 * num_sms, programs), depth_tiles // 4))


def packed_linear(x, packed, bias=None, num_splits: int | None = None) -> torch.Tensor:
    """num_splits overrides the automatic split-K choice."""
    if not isinstance(packed, QuantizedPanels):
        return layer_ops.packed_linear(x, packed, bias)
    if packed.int8_activations:  # the same products as int8 ones, exact in fp32 dots
        x = int8_rounded(x, packed.group_size, packed.input_order)
    rows, n, depth = x.shape[0], packed.out_features, packed.in_features
    if rows == 0:
        return torch.empty(0, n, dtype=torch.float32, device=x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    block_m = 16 if rows <= 16 else 64  # 16: the smallest dot
    block_n = 64
    # a tile of inputs (a power of two) holds whole words, within one group where it can
    block_k = max(16, 1 << (min(64, packed.group_size).bit_length() - 1))
    grid = [triton.cdiv(rows, block_m), triton.cdiv(n, block_n), 1]
    depth_tiles = triton.cdiv(depth, block_k)
    if num_splits is None:
        num_splits = choose_linear_splits(grid[0], grid[1], depth_tiles,
                                          _num_sms(x.device.index or 0)) if x.is_cuda else 1
    grid[2] = min(num_splits, depth_tiles)
    split_depth = triton.cdiv(depth_tiles, grid[2]) * block_k
    grid[2] = triton.cdiv(depth, split_depth)
    partial = torch.empty(grid[2], rows, n, dtype=torch.float32, device=x.device)
    order = packed.input_order
    _quantized_linear_kernel[tuple(grid)](
        x, packed.codes, packed.scales, packed.offsets, packed.codes if order is None else order,
        partial, rows, n, depth, x.stride(0), split_depth, BITS=packed.bits,
        GROUP_SIZE=packed.group_size, PANEL=PANEL_WIDTH, HAS_ORDER=order is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        TILE_IN_GROUP=packed.group_size % block_k == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    out = partial[0] if grid[2] == 1 else partial.sum(0)
    return out if bias is None else out.add_(bias)


# lora_shrink: ranks x inputs per program (16 x 128: a rank's 128 inputs are 256 or 512
# contiguous bytes). lora_expand: ranks per tile (up to 64), and outputs so that a tile holds
# 2,048 products (4,096 took 150 to 200 registers a thread on sm_90).
LORA_SHRINK_TILE = (16, 128)
LORA_MAX_RANK_TILE = 64
LORA_EXPAND_PRODUCTS = 2048


def lora_shrink(x, lora_a, token_slots) -> torch.Tensor:
    (rows, depth), rank = x.shape, lora_a.shape[1]
    h = torch.empty(rows, rank, dtype=torch.float32, device=x.device)
    if rows == 0 or rank == 0:
        return h
    x = x if x.stride(-1) == 1 else x.contiguous()
    lora_a = lora_a.contiguous()
    block_r, block_k = LORA_SHRINK_TILE
    _lora_shrink_kernel[(rows, triton.cdiv(rank, block_r))](
        x, lora_a, token_slots.contiguous(), h, rank, depth, x.stride(0), lora_a.stride(0),
        BLOCK_R=block_r, BLOCK_K=block_k)
    return h


def lora_expand(out, h, lora_b, token_slots) -> None:
    rows, n = out.shape
    if out.stride(-1) != 1:  # written in place: unit stride along the features needed
        return layer_ops.lora_expand(out, h, lora_b, token_slots)
    if rows == 0 or n == 0:
        return None
    rank = h.shape[1]
    h, lora_b = h.contiguous(), lora_b.contiguous()
    block_r = min(LORA_MAX_RANK_TILE, max(16, triton.next_power_of_2(rank)))
    block_n = LORA_EXPAND_PRODUCTS // block_r
    _lora_expand_kernel[(rows, triton.cdiv(n, block_n))](
        out, h, lora_b, token_slots.contiguous(), n, rank, out.stride(0), lora_b.stride(0),
        BLOCK_N=block_n, BLOCK_R=block_r)
    return None
