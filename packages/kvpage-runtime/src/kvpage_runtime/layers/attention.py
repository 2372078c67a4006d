"""Attention over the paged KV cache: store this step's K/V, then one varlen paged-attention call."""

from __future__ import annotations

import torch
from kvpage_kernels import paged_attention, write_kv
from torch import nn

from kvpage_runtime.forward_batch import ForwardBatch

KVCache = tuple[torch.Tensor, torch.Tensor]


class PagedAttention(nn.Module):
    """Causal (optionally sliding-window, optionally soft-capped) attention of new tokens over
    their whole cached context.

    The kernel backend is whatever ``kvpage_kernels.select_backend`` picks for the device.
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None,
        scale: float | None = None, softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.softcap = softcap

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """q [n, num_heads, head_dim], k/v [n, num_kv_heads, head_dim] -> [n, num_heads * head_dim]."""
        k_cache, v_cache = kv_cache
        write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        out = paged_attention(
            q,
            k_cache,
            v_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
            max_seq_len=batch.max_seq_len,
            max_query_len=batch.max_query_len,
        )
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
