"""Reference backend: the plainest correct torch code, one loop per sequence.

It is the ground truth that every other backend is tested against. It never reads a cache
slot beyond a sequence's length and computes in fp32.
"""

from __future__ import annotations

import torch

from ._common import apply_softcap, pairs_to_lists
from .packed_weight import QuantizedPanels
from .quantized import int8_rounded


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    block_size = k_cache.shape[1]
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = k[i]
        v_cache[slot // block_size, slot % block_size] = v[i]


def _gather_sequence(cache: torch.Tensor, table: list[int], length: int) -> torch.Tensor:
    """Keys (or values) of positions 0..length-1 of one sequence: [length, kv_heads, d]."""
    block_size = cache.shape[1]
    rows = [cache[table[p // block_size], p % block_size] for p in range(length)]
    return torch.stack(rows).float()


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, *,
                    sliding_window=None, softcap=None, out, **_hints) -> torch.Tensor:
    group = q.shape[1] // k_cache.shape[2]
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_len = starts[i + 1] - starts[i]
        if q_len == 0:
            continue
        table = block_tables[i].tolist()
        keys = _gather_sequence(k_cache, table, seq_len).repeat_interleave(group, dim=1)
        values = _gather_sequence(v_cache, table, seq_len).repeat_interleave(group, dim=1)
        queries = q[starts[i]:starts[i + 1]].float()
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        scores = apply_softcap(scores, softcap)
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        result = torch.einsum("hqk,khd->qhd", probs, values)
        out[starts[i]:starts[i + 1]] = result.to(out.dtype)
    return out


def packed_linear(x, packed, bias) -> torch.Tensor:
    """The plain matmul on the unpacked weight (bf16 weights widened to fp32, low-bit ones
    dequantized, in the inputs' natural order, and rounded to a 16-bit x's dtype), in fp32."""
    weight = packed.dense_weight()
    if isinstance(packed, QuantizedPanels) and packed.int8_activations:
        x = int8_rounded(x, packed.group_size, packed.input_order)
    if x.dtype != torch.float32:
        weight, x = weight.to(x.dtype).float(), x.float()
    out = x @ weight.T
    return out if bias is None else out + bias


def copy_blocks(kv_caches, src_dst) -> None:
    for src, dst in zip(*pairs_to_lists(src_dst), strict=True):
        for k_cache, v_cache in kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]


def swap_blocks(src_cache, dst_cache, mapping) -> None:
    for src, dst in zip(*pairs_to_lists(mapping), strict=True):
        dst_cache[dst] = src_cache[src].to(dst_cache.device)


def lora_shrink(x, lora_a, token_slots) -> torch.Tensor:
    """One row at a time through its own adapter's A."""
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            h[t] = lora_a[slot].float() @ x[t].float()
    return h


def lora_expand(out, h, lora_b, token_slots) -> None:
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            out[t] = (out[t].float() + lora_b[slot].float() @ h[t]).to(out.dtype)
