"""ModelRunner: owns the paged KV cache, turns a scheduled step into its inputs, runs the model.

Per step the Python work is one short loop over the scheduled requests (their token slices and
block tables); positions and slot mappings are computed with numpy over all tokens at once.
The inputs stay on the host (``StepInputs``) until ``execute`` moves them to the device, so
that a tensor-parallel driver can send the same inputs to every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from kvpage_kernels import copy_blocks

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.forward_batch import StepInputs
from kvpage_runtime.lora.manager import LoRAManager


class ScheduledLike(Protocol):
    """The fields of kvpage_sched.ScheduledRequest the runner reads."""

    request_id: str  # read only when drafts are given
    request: Any  # has all_token_ids and lora_id
    start: int
    num_tokens: int
    block_ids: Sequence[int]


class ModelRunner:
    """Runs one model (or one tensor-parallel rank's shard of it, ``tensor_parallel_size``
    ranks in all: its KV caches hold its own KV heads, with the same block ids as every
    rank's)."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_blocks: int,
                 block_size: int, device: torch.device, kv_dtype: torch.dtype,
                 lora: LoRAManager | None = None, tensor_parallel_size: int = 1) -> None:
        self.model = model
        self.lora = lora
        self.config = config
        self.block_size = block_size
        self.device = device
        shape = (num_blocks, block_size, config.kv_heads_per_rank(tensor_parallel_size),
                 config.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=kv_dtype, device=device),
             torch.zeros(shape, dtype=kv_dtype, device=device))
            for _ in range(config.num_layers)
        ]
        model.bind_kv_caches(self.kv_caches)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        if pairs:
            copy_blocks(self.kv_caches, list(pairs))

    def prepare(self, scheduled: Sequence[ScheduledLike],
                drafts: Mapping[str, Sequence[int]] | None = None) -> StepInputs:
        """Builds the flat batch's inputs: sequence i's tokens are all_token_ids[start:start+num_tokens],
        then its draft tokens (``drafts`` by request id: speculative decoding's, computed in
        the lookahead slots the scheduler reserved after them)."""
        num_seqs = len(scheduled)
        extra = [drafts.get(s.request_id, ()) for s in scheduled] if drafts else [()] * num_seqs
        starts = np.fromiter((s.start for s in scheduled), dtype=np.int64, count=num_seqs)
        q_lens = np.fromiter((s.num_tokens + len(e) for s, e in zip(scheduled, extra, strict=True)),
                             dtype=np.int64, count=num_seqs)
        tables = [s.block_ids for s in scheduled]
        max_blocks = max(len(t) for t in tables)
        block_tables = np.zeros((num_seqs, max_blocks), dtype=np.int64)
        ids: list[int] = []
        for i, s in enumerate(scheduled):
            block_tables[i, : len(tables[i])] = tables[i]
            ids += s.request.all_token_ids[s.start : s.start + s.num_tokens]
            ids += extra[i]
        query_start = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=query_start[1:])
        total = int(query_start[-1])
        seq_index = np.repeat(np.arange(num_seqs), q_lens)
        positions = np.arange(total, dtype=np.int64) + np.repeat(starts - query_start[:-1], q_lens)
        slots = (block_tables[seq_index, positions // self.block_size] * self.block_size
                 + positions % self.block_size)
        seq_lens = starts + q_lens
        lora_slots = None
        if self.lora is not None:
            adapters = [None if s.request.lora_id is None else int(s.request.lora_id)
                        for s in scheduled]
            lora_slots = self.lora.bind(adapters, q_lens)
        return StepInputs(
            input_ids=np.asarray(ids, dtype=np.int64),
            positions=positions,
            slot_mapping=slots,
            block_tables=block_tables.astype(np.int32),
            seq_lens=seq_lens.astype(np.int32),
            query_start_loc=query_start.astype(np.int32),
            min_context_len=int(starts.min()),
            lora_slots=lora_slots,
        )

    @torch.inference_mode()
    def execute(self, inputs: StepInputs, logits_indices: Sequence[int]) -> torch.Tensor | None:
        """Runs the model; returns logits (model dtype) for the flat token indices asked for
        (None on a tensor-parallel rank other than the driver)."""
        batch = inputs.to_batch(self.device)
        if self.lora is not None:
            self.lora.batch.token_slots = batch.lora_slots
        hidden = self.model(batch, self.kv_caches)
        if not len(logits_indices):
            return torch.empty(0, self.config.vocab_size, dtype=torch.float32, device=self.device)
        index = torch.as_tensor(np.asarray(logits_indices, dtype=np.int64), device=self.device)
        return self.model.compute_logits(hidden.index_select(0, index))
