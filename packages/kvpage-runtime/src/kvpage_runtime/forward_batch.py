"""The tensors one forward pass needs: a flat, variable-length batch over a paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ForwardBatch:
    """All sequences' new tokens concatenated, plus where their KV lives.

    Sequence ``i`` contributes the tokens ``query_start_loc[i]:query_start_loc[i+1]``; they are
    the last tokens of its ``seq_lens[i]`` tokens of context. ``slot_mapping`` gives, per token,
    ``block_id * block_size + offset`` in the KV cache (-1 skips the write).
    ``max_seq_len`` and ``max_query_len`` are host-side copies of the maxima, so that
    no kernel has to read them back from the device; ``min_context_len`` too: the fewest
    tokens of context any sequence has before its new tokens (0 when a prompt starts).
    ``lora_slots`` gives each token's LoRA adapter slot (-1: the base model), or is None when
    no token of the step has an adapter.
    """

    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    max_seq_len: int
    max_query_len: int
    min_context_len: int = 0
    lora_slots: torch.Tensor | None = None  # int32 [num_tokens]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def one_row_per_token(self) -> ForwardBatch:
        """The same tokens, each as a sequence of its own: the context of token ``j`` of a
        sequence ends with it (earlier tokens of the step included, their KV written first),
        over the sequence's block table. A decode kernel that takes one token per sequence
        then computes short multi-token queries (speculative decoding's drafts, small prefill
        chunks) exactly as causal attention over the sequence would."""
        num_tokens = self.num_tokens
        q_lens = self.query_start_loc[1:] - self.query_start_loc[:-1]
        owner = torch.repeat_interleave(torch.arange(self.num_seqs, device=q_lens.device), q_lens,
                                        output_size=num_tokens)
        rows = torch.arange(num_tokens, device=q_lens.device)
        tokens_after = self.query_start_loc[1:][owner] - 1 - rows  # later tokens of the step
        seq_lens = (self.seq_lens[owner] - tokens_after).to(torch.int32)
        return ForwardBatch(self.input_ids, self.positions, self.slot_mapping,
                            self.block_tables[owner], seq_lens,
                            torch.arange(num_tokens + 1, dtype=torch.int32, device=rows.device),
                            self.max_seq_len, 1, self.min_context_len, self.lora_slots)


@dataclass
class StepInputs:
    """A step's ``ForwardBatch`` on the host (NumPy arrays, same fields): what the model runner
    prepares from the scheduled requests, and what the driver sends the other
    tensor-parallel ranks, each of which moves it to its device (``to_batch``)."""

    input_ids: np.ndarray  # int64 [num_tokens]
    positions: np.ndarray  # int64 [num_tokens]
    slot_mapping: np.ndarray  # int64 [num_tokens]
    block_tables: np.ndarray  # int32 [num_seqs, max_blocks]
    seq_lens: np.ndarray  # int32 [num_seqs]
    query_start_loc: np.ndarray  # int32 [num_seqs + 1]
    min_context_len: int = 0
    lora_slots: np.ndarray | None = None  # int32 [num_tokens]

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max())

    @property
    def max_query_len(self) -> int:
        return int(np.diff(self.query_start_loc).max())

    def to_batch(self, device: torch.device) -> ForwardBatch:
        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(device, non_blocking=True)

        return ForwardBatch(
            input_ids=tensor(self.input_ids),
            positions=tensor(self.positions),
            slot_mapping=tensor(self.slot_mapping),
            block_tables=tensor(self.block_tables),
            seq_lens=tensor(self.seq_lens),
            query_start_loc=tensor(self.query_start_loc),
            max_seq_len=self.max_seq_len,
            max_query_len=self.max_query_len,
            min_context_len=self.min_context_len,
            lora_slots=None if self.lora_slots is None else tensor(self.lora_slots),
        )
