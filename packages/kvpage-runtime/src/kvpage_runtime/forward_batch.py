"""The tensors one forward pass needs: a flat, variable-length batch over a paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """All sequences' new tokens concatenated, plus where their KV lives.

    Sequence ``i`` contributes the tokens ``query_start_loc[i]:query_start_loc[i+1]``; they are
    the last tokens of its ``seq_lens[i]`` tokens of context. ``slot_mapping`` gives, per token,
    ``block_id * block_size + offset`` in the KV cache (-1 skips the write).
    ``max_seq_len`` and ``max_query_len`` are host-side copies of the maxima, so that
    no kernel has to read them back from the device.
    """

    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    max_seq_len: int
    max_query_len: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
