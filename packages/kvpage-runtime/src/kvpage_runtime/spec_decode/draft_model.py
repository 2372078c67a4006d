"""The draft-model proposer: a smaller model with the same vocabulary drafts the tokens.

The draft model keeps its own paged KV cache, with the same block ids as the target's (one
more cache tensor per layer, indexed by the target's block tables and slots), so it needs no
block manager of its own: it follows the target's block copies, and a rejected draft's KV is
simply overwritten later. It runs only in steps where requests draft: each of those first
catches up on the tokens the draft has not computed (from the prompt's start for a request
new to it, prefix-cache hits included; else from its last valid token: tokens of steps
without drafts and its own rejected drafts), then drafts ``k`` tokens one forward pass at a
time, for all drafting requests of the step together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from kvpage_kernels import argmax

from kvpage_runtime.errors import EngineConfigError
from kvpage_runtime.loaders import load_model
from kvpage_runtime.model_runner import ModelRunner
from kvpage_runtime.sampling import SamplingRow
from kvpage_runtime.sampling.sampler import sampling_probs


@dataclass
class _Tokens:
    """The ``ScheduledLike`` fields the runner reads: tokens, where to start, how many."""

    request: object  # has all_token_ids
    start: int
    num_tokens: int
    block_ids: Sequence[int]


@dataclass
class _Extended:
    all_token_ids: list[int]


@dataclass
class Drafts:
    """One request's drafts, the distributions they were drawn from (None: greedy), and how
    many it was allowed (the proposer may find fewer)."""

    tokens: list[int]
    probs: torch.Tensor | None
    limit: int


class DraftModelProposer:
    def __init__(self, model: str, target_vocab_size: int, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        loaded = load_model(model, dtype=dtype, device=device)
        if loaded.config.vocab_size != target_vocab_size:
            raise EngineConfigError(
                f"the draft model {model!r} has a vocabulary of {loaded.config.vocab_size} "
                f"tokens, the target's has {target_vocab_size}: they must be the same")
        self.runner = ModelRunner(loaded.model, loaded.config, num_blocks, block_size, device,
                                  loaded.config.dtype)
        self._computed: dict[str, int] = {}  # request id -> tokens whose draft KV is valid

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        self.runner.copy_blocks(pairs)

    def forget(self, request_ids: Sequence[str]) -> None:
        """Requests preempted (or finished): their draft KV is gone with their blocks."""
        for request_id in request_ids:
            self._computed.pop(request_id, None)

    def propose(self, scheduled: Sequence, wanted: dict[str, tuple[int, SamplingRow]],
                generator: torch.Generator) -> dict[str, Drafts]:
        """Draft ``k`` tokens for each request in ``wanted`` (request id -> (k, its sampling
        row)), after catching up on their tokens."""
        drafting = [sr for sr in scheduled if sr.request_id in wanted]
        if not drafting:
            return {}
        logits = self._forward([self._catch_up(sr) for sr in drafting], range(len(drafting)))
        drafts = {sr.request_id: Drafts([], None, wanted[sr.request_id][0]) for sr in drafting}
        rows = dict(zip(drafts, logits, strict=True))
        by_id = {sr.request_id: sr for sr in drafting}
        longest = max(wanted[rid][0] for rid in drafts)
        for step in range(longest):
            active = [rid for rid in drafts if step < wanted[rid][0]]
            for rid in active:
                self._draw(drafts[rid], rows[rid], wanted[rid][1], generator)
            if step + 1 == longest:
                break
            fed = [rid for rid in active if step + 1 < wanted[rid][0]]
            work = [self._feed(by_id[rid], drafts[rid].tokens) for rid in fed]
            rows = dict(zip(fed, self._forward(work, range(len(work))), strict=True))
        for rid, draft in drafts.items():  # it fed all drafts but the last
            self._computed[rid] += max(len(draft.tokens) - 1, 0)
        return drafts

    def _catch_up(self, sr) -> _Tokens:
        """The tokens the target has (or will have after this step) that the draft has not
        computed; from where its KV stops being valid."""
        end = sr.start + sr.num_tokens
        begin = min(self._computed.get(sr.request_id, 0), sr.start)
        self._computed[sr.request_id] = end
        return _Tokens(sr.request, begin, end - begin, sr.block_ids)

    def _feed(self, sr, drafts: list[int]) -> _Tokens:
        """The request's newest draft, at the position after the previous ones."""
        tokens = list(sr.request.all_token_ids[: sr.start + sr.num_tokens]) + drafts
        return _Tokens(_Extended(tokens), len(tokens) - 1, 1, sr.block_ids)

    def _forward(self, work: list[_Tokens], entries: Sequence[int]) -> torch.Tensor:
        """The draft model over ``work``; fp32 logits of the last token of the ``entries``
        (indices into ``work``) that draft."""
        if not work:
            return torch.empty(0)
        batch = self.runner.prepare(work)
        last = torch.cumsum(torch.tensor([w.num_tokens for w in work]), 0) - 1
        return self.runner.execute(batch, last[list(entries)].tolist()).float()

    @staticmethod
    def _draw(drafts: Drafts, logits: torch.Tensor, row: SamplingRow,
              generator: torch.Generator) -> None:
        """One more draft from the draft model's distribution (its argmax for greedy rows)."""
        if row.params.is_greedy:
            drafts.tokens.append(int(argmax(logits[None])[0]))
            return
        probs = sampling_probs(logits[None], [row])[0]
        gen = row.generator or generator
        drafts.tokens.append(int(torch.multinomial(probs, 1, generator=gen)))
        stacked = probs[None] if drafts.probs is None else torch.cat([drafts.probs, probs[None]])
        drafts.probs = stacked
