"""Fast batched torch backend (any device; the CPU path of the runtime).

Decode tokens (q_len 1) of all sequences are served together: the keys and values each one
needs are gathered through the block tables into a padded [seqs, kv_heads, ctx, d] view and
the queries are viewed as [seqs, kv_heads, group, d], so GQA costs no copy of K/V, and one
SDPA call does the rest. On the CPU the decode batch is cut into chunks of sequences of
similar length, gathered into reused buffers, and in fp32 the values are not gathered at all:
P @ V runs as an embedding bag over the cache rows. Prefill chunks are served one sequence at a
time (they are few and large). Padding positions point at a real slot of the same sequence
and are masked, so no unused (possibly NaN) slot is read. The slots and masks of a step are
planned once and reused by every layer."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import apply_softcap, copy_blocks_indexed, swap_blocks_indexed

copy_blocks = copy_blocks_indexed
swap_blocks = swap_blocks_indexed


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


# Decode batches on the CPU are cut into chunks of this many sequences, sorted by length: each
# chunk pads only to its own longest context and its gathered K/V stay in the CPU cache.
# (Smaller chunks measured no faster on one thread and slower on two: more parallel ops.)
DECODE_CHUNK = 64
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


def _head_rows(slots: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Rows of the cache viewed as [slots * kv_heads, d] for slots [seqs, ctx]:
    [seqs, kv_heads, ctx], so that the gather lays K/V out head-major (what SDPA reads best)."""
    heads = torch.arange(num_kv_heads, device=slots.device).view(1, -1, 1)
    return slots.unsqueeze(1) * num_kv_heads + heads


def _gather(cache: torch.Tensor, rows: torch.Tensor, which: int) -> torch.Tensor:
    """cache rows `rows` [seqs, kv_heads, ctx] (see _head_rows) as [seqs, kv_heads, ctx, d]."""
    head_dim = cache.shape[3]
    flat = cache.view(-1, head_dim)
    index = rows.view(-1)
    numel = index.numel() * head_dim
    if cache.device.type == "cpu" and numel * cache.element_size() <= WORKSPACE_MAX_BYTES:
        out = _buffer(which, numel, cache).view(-1, head_dim)
        gathered = torch.index_select(flat, 0, index, out=out)
    else:
        gathered = flat.index_select(0, index)
    return gathered.view(*rows.shape, head_dim)


def _slots(block_tables, first_pos, seq_lens, ctx: int, block_size: int):
    """Cache slots of positions first_pos .. first_pos+ctx-1 of each sequence ([seqs, ctx]),
    positions past a sequence's end redirected to its last token; plus those positions and
    the validity mask."""
    pos = first_pos.unsqueeze(1) + torch.arange(ctx, device=seq_lens.device)
    valid = pos < seq_lens.unsqueeze(1)
    pos = torch.minimum(pos, (seq_lens - 1).clamp(min=0).unsqueeze(1))
    blocks = block_tables.gather(1, pos // block_size).long()
    return blocks * block_size + pos % block_size, pos, valid


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, -inf elsewhere (SDPA would convert a boolean mask on every call)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf"))


def _attend(q, keys, values, mask, scale, softcap):
    """q [b, kvh, m, d]; keys/values [b, kvh, n, d]; additive mask broadcastable to
    [b, kvh, m, n]. Returns [b, kvh, m, d] in q's dtype."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
    scores = apply_softcap(scores, softcap) + mask
    return torch.matmul(torch.softmax(scores, dim=-1), values.float()).to(q.dtype)


@dataclass(frozen=True)
class _Layout:
    """What a plan depends on besides the metadata tensors."""

    block_size: int
    num_kv_heads: int
    group: int
    dtype: torch.dtype
    sliding_window: int | None

    @property
    def bags(self) -> bool:
        """fp32 decode on the CPU: P @ V as an embedding bag straight from the cache (no V
        gather). Each query head of a group reads the value rows again, so large groups keep
        the gather (measured: faster at group 3, slower at 4); half types keep SDPA, whose
        scores stay fp32."""
        return self.dtype == torch.float32 and self.group <= 3


@dataclass(frozen=True)
class _Work:
    """One attention call: K/V at cache rows `rows` [b, kv_heads, ctx] (_head_rows) and an
    additive mask broadcastable to [b, kv_heads, queries, ctx]. Decode work serves the q rows
    `q_rows` (None: every row, in order), with `bag_rows` ([b * kv_heads * group, ctx], the
    rows repeated per query head) when V is read as embedding bags; prefill work (b = 1)
    serves the chunk q[start:end]."""

    rows: torch.Tensor
    mask: torch.Tensor
    q_rows: torch.Tensor | None = None
    bag_rows: torch.Tensor | None = None
    start: int = 0
    end: int = 0
    prefill: bool = False


def _decode_work(block_tables, seq_lens, q_rows, layout: _Layout,
                 max_seq_len: int | None) -> list[_Work]:
    """Decode tokens of the given sequences; on the CPU in chunks of similar length."""
    if seq_lens.device.type != "cpu" or seq_lens.shape[0] <= DECODE_CHUNK:
        if max_seq_len is None or seq_lens.device.type == "cpu":  # free on the CPU: exact
            max_seq_len = int(seq_lens.max())
        return [_decode_chunk(block_tables, seq_lens, q_rows, layout, max_seq_len)]
    lens, order = seq_lens.sort()
    lens_host = lens.tolist()
    work = []
    for begin in range(0, len(lens_host), DECODE_CHUNK):
        end = min(begin + DECODE_CHUNK, len(lens_host))
        chunk = order[begin:end]
        work.append(_decode_chunk(block_tables.index_select(0, chunk), lens[begin:end],
                                  chunk if q_rows is None else q_rows.index_select(0, chunk),
                                  layout, lens_host[end - 1]))
    return work


def _decode_chunk(block_tables, seq_lens, q_rows, layout: _Layout, max_seq_len: int) -> _Work:
    seq_lens = seq_lens.long()
    ctx = max_seq_len
    first = torch.zeros_like(seq_lens)
    if layout.sliding_window is not None:
        ctx = min(ctx, layout.sliding_window)
        first = (seq_lens - layout.sliding_window).clamp(min=0)
    slots, _, valid = _slots(block_tables, first, seq_lens, ctx, layout.block_size)
    rows = _head_rows(slots, layout.num_kv_heads)
    bag_rows = None
    if layout.bags and rows.device.type == "cpu":
        bag_rows = rows.unsqueeze(2).expand(-1, -1, layout.group, -1).reshape(-1, ctx)
    return _Work(rows, _additive(valid.view(-1, 1, 1, ctx), layout.dtype), q_rows, bag_rows)


def _prefill_work(table, seq_len: int, start: int, end: int, layout: _Layout) -> _Work:
    """The chunk q[start:end] of one sequence, at positions seq_len-q_len .. seq_len-1.
    Its mask rows are ordered (token, group member), as _run_prefill lays out the queries."""
    device, window = table.device, layout.sliding_window
    first_q = seq_len - (end - start)
    first_k = 0 if window is None else max(0, first_q - window + 1)
    slots, k_pos, _ = _slots(table.unsqueeze(0), torch.tensor([first_k], device=device),
                             torch.tensor([seq_len], device=device), seq_len - first_k,
                             layout.block_size)
    q_pos = torch.arange(first_q, seq_len, device=device).unsqueeze(1)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    mask = mask.repeat_interleave(layout.group, dim=0).view(1, 1, -1, mask.shape[1])
    return _Work(_head_rows(slots, layout.num_kv_heads), _additive(mask, layout.dtype),
                 start=start, end=end, prefill=True)


def _plan(q, block_tables, seq_lens, query_start_loc, layout: _Layout, max_seq_len,
          max_query_len) -> list[_Work]:
    num_seqs = seq_lens.shape[0]
    if max_query_len == 1 and q.shape[0] == num_seqs:
        return _decode_work(block_tables, seq_lens, None, layout, max_seq_len)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decode = [i for i in range(num_seqs) if starts[i + 1] - starts[i] == 1]
    work = []
    if decode:
        seqs = torch.tensor(decode, device=q.device)
        q_rows = torch.tensor([starts[i] for i in decode], device=q.device)
        work = _decode_work(block_tables.index_select(0, seqs), seq_lens.index_select(0, seqs),
                            q_rows, layout, max(lens[i] for i in decode))
    for i, seq_len in enumerate(lens):
        if starts[i + 1] - starts[i] > 1:
            work.append(_prefill_work(block_tables[i], seq_len, starts[i], starts[i + 1],
                                      layout))
    return work


_plans = threading.local()


def _cached_plan(q, block_tables, seq_lens, query_start_loc, layout: _Layout, max_seq_len,
                 max_query_len) -> list[_Work]:
    """Every layer of a model step passes the same metadata tensors: the plan is computed
    once per step. The last key holds the tensors themselves (so their identity cannot be
    reused while cached) and their versions (an in-place change invalidates it)."""
    metadata = (block_tables, seq_lens, query_start_loc)
    if any(t.is_inference() for t in metadata):
        # Inference tensors have no version counter, so an in-place change could not be seen.
        return _plan(q, block_tables, seq_lens, query_start_loc, layout, max_seq_len,
                     max_query_len)
    key = (tuple(t._version for t in metadata), q.shape[0], layout, max_seq_len, max_query_len)
    cached = getattr(_plans, "last", None)
    if cached is not None and cached[1] == key and all(
            a is b for a, b in zip(cached[0], metadata, strict=True)):
        return cached[2]
    plan = _plan(q, block_tables, seq_lens, query_start_loc, layout, max_seq_len,
                 max_query_len)
    _plans.last = (metadata, key, plan)
    return plan


def _run_prefill(work: _Work, q, k_cache, v_cache, scale, softcap, out) -> None:
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    keys, values = _gather(k_cache, work.rows, 0), _gather(v_cache, work.rows, 1)
    chunk = q[work.start:work.end]
    q_len, num_heads = chunk.shape[0], chunk.shape[1]
    group = num_heads // num_kv_heads
    grouped = chunk.reshape(q_len, num_kv_heads, group, head_dim).transpose(0, 1)
    grouped = grouped.reshape(1, num_kv_heads, q_len * group, head_dim)
    result = _attend(grouped, keys, values, work.mask, scale, softcap)
    result = result.view(num_kv_heads, q_len, group, head_dim).transpose(0, 1)
    out[work.start:work.end] = result.reshape(chunk.shape)


def _attend_bags(q, keys, v_cache, work: _Work, scale, softcap) -> torch.Tensor:
    """Decode attention reading V as embedding bags: out row (seq, head) is the sum over
    positions of p * V[row] (fp32; grouped q [b, kv_heads, group, d])."""
    scores = torch.matmul(q * scale, keys.transpose(-1, -2))
    probs = torch.softmax(apply_softcap(scores, softcap).add_(work.mask), dim=-1)
    flat_v = v_cache.view(-1, v_cache.shape[3])
    return F.embedding_bag(work.bag_rows, flat_v, per_sample_weights=probs.view(
        work.bag_rows.shape), mode="sum")


def _run_decode(work: _Work, q, k_cache, v_cache, scale, softcap, out) -> None:
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    part = q if work.q_rows is None else q.index_select(0, work.q_rows)
    grouped = part.reshape(part.shape[0], num_kv_heads, part.shape[1] // num_kv_heads, head_dim)
    keys = _gather(k_cache, work.rows, 0)
    if work.bag_rows is not None:
        result = _attend_bags(grouped, keys, v_cache, work, scale, softcap)
    else:
        result = _attend(grouped, keys, _gather(v_cache, work.rows, 1), work.mask, scale,
                         softcap)
    result = result.reshape(part.shape)
    if work.q_rows is None:
        out.copy_(result)
    else:
        out.index_copy_(0, work.q_rows, result)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, *,
                    sliding_window=None, softcap=None, max_seq_len=None, max_query_len=None,
                    out) -> torch.Tensor:
    if seq_lens.shape[0] == 0 or q.shape[0] == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    layout = _Layout(k_cache.shape[1], num_kv_heads, q.shape[1] // num_kv_heads, q.dtype,
                     sliding_window)
    plan = _cached_plan(q, block_tables, seq_lens, query_start_loc, layout, max_seq_len,
                        max_query_len)
    for work in plan:
        run = _run_prefill if work.prefill else _run_decode
        run(work, q, k_cache, v_cache, scale, softcap, out)
    return out
