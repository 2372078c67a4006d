"""Speculative decoding: proposers draft tokens, the target verifies them in one forward pass.

Each step the proposer (``ngram`` or ``draft_model``) drafts up to ``k`` tokens for each
decode request that may speculate; the scheduler has reserved ``k`` lookahead slots after its
token (``num_lookahead_tokens``), so the target computes the token and the drafts in the same
forward pass and gives logits after each; ``rejection.verify`` accepts a prefix of the drafts
and draws one more token so that the output is distributed exactly as without drafts; the
scheduler keeps the accepted drafts' KV and rolls the rest back (the cache's ``truncate``).
Requests with and without drafts, and with different numbers of them, share the batch.

With ``adaptive`` (the default) each step drafts the length, up to ``k``, that has emitted
the most tokens per second in recent steps with as many decode requests (``adaptive``):
speculation switches itself off for batch sizes where it does not pay on this machine and
this text, and comes back when it does. ``disable_by_batch_size`` switches it off above a
fixed size instead, as vLLM's option does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvpage_runtime.sampling import SamplingRow
from kvpage_runtime.spec_decode import ngram
from kvpage_runtime.spec_decode.adaptive import DraftLengthChooser
from kvpage_runtime.spec_decode.config import SpeculativeConfig
from kvpage_runtime.spec_decode.draft_model import DraftModelProposer, Drafts
from kvpage_runtime.spec_decode.rejection import verify

__all__ = ["Drafts", "SpeculativeConfig", "Speculator", "build_speculator"]


class Speculator:
    def __init__(self, config: SpeculativeConfig, draft_model: DraftModelProposer | None) -> None:
        self.config = config
        self.draft_model = draft_model
        k = config.num_speculative_tokens
        self.chooser = DraftLengthChooser(k) if config.adaptive else None
        self._step: tuple[int, int] | None = None  # (decode requests, draft length) measured

    @property
    def num_speculative_tokens(self) -> int:
        return self.config.num_speculative_tokens

    def begin_step(self, block_copies: Sequence[tuple[int, int]],
                   released_ids: Sequence[str]) -> None:
        """Follow the step's block copies; forget the requests whose blocks went back."""
        self._step = None
        if self.draft_model is not None:
            self.draft_model.copy_blocks(block_copies)
            self.draft_model.forget(released_ids)

    def propose(self, scheduled: Sequence, sampling_row: Callable[[str], SamplingRow | None],
                generator: torch.Generator) -> dict[str, Drafts]:
        """Drafts for the decode requests of ``scheduled`` allowed to speculate (those whose
        ``sampling_row`` is not None), at most their reserved lookahead and this step's draft
        length; the rows are asked for only in a step that drafts."""
        k = self._draft_length(scheduled)
        if k == 0:
            return {}
        wanted = {}
        for sr in scheduled:
            limit = min(k, sr.num_lookahead_tokens)
            if limit and not sr.is_prefill_chunk and (row := sampling_row(sr.request_id)):
                wanted[sr.request_id] = (limit, row)
        if self.draft_model is not None:
            return self.draft_model.propose(scheduled, wanted, generator)
        drafts = {}
        for sr in scheduled:
            if sr.request_id in wanted:
                limit = wanted[sr.request_id][0]
                tokens = ngram.propose(sr.request.all_token_ids, limit,
                                       self.config.prompt_lookup_min,
                                       self.config.prompt_lookup_max)
                if tokens:
                    drafts[sr.request_id] = Drafts(tokens, None, limit)
                elif self.chooser is not None:
                    self.chooser.record_drafts(limit, 0)  # nothing to offer: nothing gained
        return drafts

    def _draft_length(self, scheduled: Sequence) -> int:
        """k; 0 in a step of ``disable_by_batch_size`` requests or more; with ``adaptive``, the
        chooser's length for the step's decode requests (a step that also computes prompts
        takes the length preferred so far, 0 before any, and is not timed)."""
        limit = self.config.disable_by_batch_size
        if limit is not None and len(scheduled) >= limit:
            return 0
        if self.chooser is None:
            return self.config.num_speculative_tokens
        decode = sum(1 for sr in scheduled if sr.num_tokens == 1 and not sr.is_prefill_chunk)
        if decode < len(scheduled):
            return self.chooser.best(decode) or 0
        k = self.chooser.choose(decode)
        self._step = (decode, k)
        return k

    def end_step(self, seconds: float) -> None:
        """The step took ``seconds``: what its draft length cost."""
        if self._step is not None:
            self.chooser.record_step(*self._step, seconds)
            self._step = None

    def verify(self, target: torch.Tensor, drafts: Drafts, row: SamplingRow,
               generator: torch.Generator) -> list[int]:
        """The tokens the request emits this step (see ``rejection.verify``)."""
        tokens = verify(target, drafts.tokens, row, drafts.probs, row.generator or generator)
        if self.chooser is not None:
            self.chooser.record_drafts(drafts.limit, len(tokens) - 1)
        return tokens


def build_speculator(config: SpeculativeConfig, target_vocab_size: int, num_blocks: int,
                     block_size: int, device: torch.device, dtype: torch.dtype) -> Speculator:
    """The speculator ``config`` asks for, its draft model loaded if it has one."""
    draft = None
    if config.method == "draft_model":
        draft = DraftModelProposer(config.model, target_vocab_size, num_blocks, block_size,
                                   device, dtype)
    return Speculator(config, draft)
