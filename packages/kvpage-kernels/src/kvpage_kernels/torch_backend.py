"""Fast batched torch backend (any device; the CPU path of the runtime).

Decode tokens (q_len 1) of all sequences are served together: the keys and values each one
needs are gathered through the block tables into a padded [seqs, kv_heads, ctx, d] tensor and
the queries are viewed as [seqs, kv_heads, group, d], so GQA costs no copy of K/V. On the
CPU the decode batch is cut into chunks of sequences of similar length. Prefill
chunks are served one sequence at a time (they are few and large). Padding positions point at
a real slot of the same sequence and are masked, so no unused (possibly NaN) slot is read.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ._common import apply_softcap, copy_blocks_indexed, swap_blocks_indexed

copy_blocks = copy_blocks_indexed
swap_blocks = swap_blocks_indexed


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k[keep])
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v[keep])


# Decode batches on the CPU are cut into chunks of this many sequences, sorted by length: each
# chunk pads only to its own longest context and its gathered K/V stay in the CPU cache.
DECODE_CHUNK = 32
# Gathers of up to this many bytes reuse a per-thread buffer (larger ones are allocated).
WORKSPACE_MAX_BYTES = 64 << 20
_workspace = threading.local()


def _buffer(which: int, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A reusable per-thread CPU buffer (which: 0 for keys, 1 for values). Fresh multi-MB
    allocations on every call cost more in page faults than the gather itself."""
    buffers = getattr(_workspace, "buffers", None)
    if buffers is None:
        buffers = _workspace.buffers = {}
    key = (which, like.dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel]


def _gather(cache: torch.Tensor, slots: torch.Tensor, which: int) -> torch.Tensor:
    """cache rows at `slots` [seqs, ctx] as a [seqs, kv_heads, ctx, d] view."""
    num_kv_heads, head_dim = cache.shape[2], cache.shape[3]
    flat = cache.view(-1, num_kv_heads, head_dim)
    index = slots.reshape(-1)
    if cache.device.type == "cpu" and cache[0, 0].nbytes * index.numel() <= WORKSPACE_MAX_BYTES:
        out = _buffer(which, index.numel() * num_kv_heads * head_dim, cache)
        rows = torch.index_select(flat, 0, index, out=out.view(-1, num_kv_heads, head_dim))
    else:
        rows = flat.index_select(0, index)
    return rows.view(*slots.shape, num_kv_heads, head_dim).transpose(1, 2)


def _slots(block_tables, first_pos, seq_lens, ctx: int, block_size: int):
    """Cache slots of positions first_pos .. first_pos+ctx-1 of each sequence ([seqs, ctx]),
    positions past a sequence's end redirected to its last token; plus those positions and
    the validity mask."""
    pos = first_pos.unsqueeze(1) + torch.arange(ctx, device=seq_lens.device)
    valid = pos < seq_lens.unsqueeze(1)
    pos = torch.minimum(pos, (seq_lens - 1).clamp(min=0).unsqueeze(1))
    blocks = block_tables.gather(1, pos // block_size).long()
    return blocks * block_size + pos % block_size, pos, valid


def _attend(q, keys, values, mask, scale, softcap):
    """q [b, kvh, m, d]; keys/values [b, kvh, n, d]; mask broadcastable to [b, kvh, m, n]
    (True = attend). Returns [b, kvh, m, d] in q's dtype."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
    scores = apply_softcap(scores, softcap).masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values.float()).to(q.dtype)


def _decode_chunk(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                  softcap, max_seq_len: int) -> torch.Tensor:
    """Decode tokens q [seqs, heads, d] of sequences whose longest context is max_seq_len."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    seq_lens = seq_lens.long()
    ctx = max_seq_len
    first = torch.zeros_like(seq_lens)
    if sliding_window is not None:
        ctx = min(ctx, sliding_window)
        first = (seq_lens - sliding_window).clamp(min=0)
    slots, _, valid = _slots(block_tables, first, seq_lens, ctx, k_cache.shape[1])
    keys, values = _gather(k_cache, slots, 0), _gather(v_cache, slots, 1)
    grouped = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = _attend(grouped, keys, values, valid.view(num_seqs, 1, 1, ctx), scale, softcap)
    return out.reshape(num_seqs, num_heads, head_dim)


def _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap,
            max_seq_len: int | None, out) -> None:
    """All-decode batch: writes attention of q [seqs, heads, d] into out."""
    args = (k_cache, v_cache)
    opts = (scale, sliding_window, softcap)
    if q.device.type != "cpu" or q.shape[0] <= DECODE_CHUNK:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        out.copy_(_decode_chunk(q, *args, block_tables, seq_lens, *opts, max_seq_len))
        return
    lens, order = seq_lens.sort()
    lens_host = lens.tolist()
    for begin in range(0, len(lens_host), DECODE_CHUNK):
        end = min(begin + DECODE_CHUNK, len(lens_host))
        rows = order[begin:end]
        result = _decode_chunk(q.index_select(0, rows), *args, block_tables.index_select(0, rows),
                               lens[begin:end], *opts, lens_host[end - 1])
        out.index_copy_(0, rows, result)


def _prefill_one(q, k_cache, v_cache, table, seq_len: int, scale, sliding_window, softcap):
    """One sequence's chunk q [q_len, heads, d] at positions seq_len-q_len .. seq_len-1."""
    q_len, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    first_q = seq_len - q_len
    first_k = 0 if sliding_window is None else max(0, first_q - sliding_window + 1)
    ctx = seq_len - first_k
    seq_len_t = torch.tensor([seq_len], device=q.device)
    first_t = torch.tensor([first_k], device=q.device)
    slots, k_pos, _ = _slots(table.unsqueeze(0), first_t, seq_len_t, ctx, k_cache.shape[1])
    keys, values = _gather(k_cache, slots, 0), _gather(v_cache, slots, 1)
    q_pos = torch.arange(first_q, seq_len, device=q.device).unsqueeze(1)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    # rows ordered (token, group member) so that each kv head sees its own query rows
    grouped = q.reshape(q_len, num_kv_heads, group, head_dim).transpose(0, 1)
    grouped = grouped.reshape(1, num_kv_heads, q_len * group, head_dim)
    mask = mask.repeat_interleave(group, dim=0).view(1, 1, q_len * group, ctx)
    out = _attend(grouped, keys, values, mask, scale, softcap)
    return out.view(num_kv_heads, q_len, group, head_dim).transpose(0, 1).reshape(q.shape)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, *,
                    sliding_window=None, softcap=None, max_seq_len=None, max_query_len=None,
                    out) -> torch.Tensor:
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    if max_query_len == 1 and q.shape[0] == num_seqs:
        _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap,
                max_seq_len, out)
        return out
    _mixed(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
           sliding_window, softcap, out)
    return out


def _mixed(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
           sliding_window, softcap, out) -> None:
    """A batch with prefill chunks: decode rows batched, each chunk on its own."""
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decode = [i for i in range(len(lens)) if starts[i + 1] - starts[i] == 1]
    if decode:
        rows = torch.tensor([starts[i] for i in decode], device=q.device)
        seqs = torch.tensor(decode, device=q.device)
        result = torch.empty(len(decode), *q.shape[1:], dtype=q.dtype, device=q.device)
        _decode(q.index_select(0, rows), k_cache, v_cache, block_tables.index_select(0, seqs),
                seq_lens.index_select(0, seqs), scale, sliding_window, softcap,
                max(lens[i] for i in decode), result)
        out.index_copy_(0, rows, result)
    for i, seq_len in enumerate(lens):
        if starts[i + 1] - starts[i] > 1:
            out[starts[i]:starts[i + 1]] = _prefill_one(
                q[starts[i]:starts[i + 1]], k_cache, v_cache, block_tables[i], seq_len,
                scale, sliding_window, softcap)
