"""Verifying drafts by rejection sampling (Leviathan et al. 2023, Chen et al. 2023).

The target model scored every drafted position in one forward pass: ``target`` holds the
logits of the positions after the last accepted token and after each draft. Draft ``j`` is
accepted with probability ``min(1, p_j(d) / q_j(d))``, where ``p_j`` is the target's sampling
distribution (temperature, top-k, top-p and min-p applied as the sampler applies them) and
``q_j`` the proposer's (a point mass on the draft for the n-gram proposer); at the first
rejection a token is drawn from ``max(p_j - q_j, 0)`` renormalised, which makes the emitted
token distributed exactly as ``p_j``; when every draft is accepted a bonus token is drawn from
the distribution after the last one. A greedy request accepts a draft exactly when it is the
target's argmax there, so it emits what it would have emitted without drafts.
"""

from __future__ import annotations

import torch
from kvpage_kernels import argmax

from kvpage_runtime.sampling import SamplingRow
from kvpage_runtime.sampling.sampler import sampling_probs


def verify(target: torch.Tensor, drafts: list[int], row: SamplingRow,
           draft_probs: torch.Tensor | None, generator: torch.Generator) -> list[int]:
    """The tokens to emit: accepted drafts, then one drawn token (correction or bonus).

    ``target``: fp32 logits [len(drafts) + 1, vocab]; ``draft_probs``: the proposer's
    distributions [len(drafts), vocab], or None for drafts proposed with certainty.
    """
    if row.params.is_greedy:
        return _verify_greedy(argmax(target).tolist(), drafts)
    probs = sampling_probs(target, [row] * target.shape[0])
    emitted = []
    for j, draft in enumerate(drafts):
        q = draft_probs[j, draft] if draft_probs is not None else 1.0
        if torch.rand(1, generator=generator) * q < probs[j, draft]:  # accept with p / q
            emitted.append(draft)
            continue
        residual = probs[j].clone()
        if draft_probs is None:
            residual[draft] = 0.0
        else:
            residual = (residual - draft_probs[j]).clamp_(min=0.0)
        emitted.append(_draw(residual if residual.sum() > 0 else probs[j], generator))
        return emitted
    return emitted + [_draw(probs[len(drafts)], generator)]


def _verify_greedy(best: list[int], drafts: list[int]) -> list[int]:
    emitted = []
    for j, draft in enumerate(drafts):
        emitted.append(best[j])
        if best[j] != draft:
            return emitted
    return emitted + [best[len(drafts)]]


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(weights, 1, generator=generator))
