"""Log-probabilities of the raw model distribution: top-k entries plus the chosen token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class TokenLogprobs:
    """One position's top-k (token id, logprob) pairs, rank 1 first, plus the chosen token's."""

    top_ids: list[int]
    top_logprobs: list[float]
    row: torch.Tensor = field(repr=False)  # log_softmax of the position's logits
    token_id: int = -1
    logprob: float = float("nan")
    rank: int = 0

    def with_sampled(self, token_id: int) -> TokenLogprobs:
        """Fills in the chosen token's logprob and rank (1 + number of strictly likelier tokens)."""
        value = self.row[token_id]
        self.token_id = token_id
        self.logprob = float(value)
        self.rank = int((self.row > value).sum()) + 1
        return self

    def entries(self) -> dict[int, tuple[float, int]]:
        """token id -> (logprob, rank) for the top-k tokens and the chosen one."""
        out = {t: (lp, r) for r, (t, lp) in enumerate(zip(self.top_ids, self.top_logprobs, strict=True), 1)}
        out.setdefault(self.token_id, (self.logprob, self.rank))
        return out


def top_logprobs(logits: torch.Tensor, ks: Sequence[int]) -> list[TokenLogprobs]:
    """log_softmax over fp32 logits [rows, vocab], then each row's top ks[i] entries."""
    rows = torch.log_softmax(logits.float(), dim=-1)
    kmax = max(ks, default=0)
    if kmax:
        values, ids = rows.topk(kmax, dim=-1)
        values, ids = values.tolist(), ids.tolist()
    else:
        values = ids = [[] for _ in ks]
    return [TokenLogprobs(ids[i][:k], values[i][:k], rows[i]) for i, k in enumerate(ks)]
