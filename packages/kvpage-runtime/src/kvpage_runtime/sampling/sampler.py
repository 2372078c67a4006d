"""Batched sampler: one call turns a step's logits into one token per row, computing in fp32.

A batch that is all plain greedy (no logprobs, no logits processing) is an argmax of the
logits as they come (model dtype: the same tokens, without an fp32 copy of them).

Order (vLLM semantics): min_tokens masking and logit bias, then penalties (repetition over
prompt + output, presence/frequency over output), then greedy argmax for temperature-0 rows,
and for the others temperature, top-k, top-p, min-p and an exponential-race draw (argmax of
p / q with q ~ Exp(1)), which needs one noise vector per row: seeded rows draw theirs from
their own torch.Generator so their tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from kvpage_kernels import argmax

from kvpage_runtime.sampling.logprobs import TokenLogprobs, top_logprobs
from kvpage_runtime.sampling.params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row (one sequence) of the step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None  # on the logits' device
    blocked_token_ids: Sequence[int] = ()  # ids masked while min_tokens is not reached


@dataclass
class SamplerOutput:
    token_ids: list[int | None]  # None: a row the engine could not sample (it failed alone)
    logprobs: list[TokenLogprobs | None]  # per row, None where not requested


class Sampler:
    """Stateless apart from the generator that unseeded rows draw from."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        if all(_plain_greedy(r) for r in rows):
            # argmax of the model-dtype logits: their fp32 values are exact, the first maximum
            # the same, and the [rows, vocab] fp32 copy is spared
            return SamplerOutput(argmax(logits).tolist(), [None] * len(rows))
        logits = logits.float()
        logprobs = self._logprobs(logits, rows)
        logits = _apply_logits_processors(logits, rows)
        greedy = [r.params.is_greedy for r in rows]
        tokens = argmax(logits) if all(greedy) else self._sample(logits, rows, greedy)
        token_list = tokens.tolist()
        if any(lp is not None for lp in logprobs):
            logprobs = [None if lp is None else lp.with_sampled(t)
                        for lp, t in zip(logprobs, token_list, strict=True)]
        return SamplerOutput(token_list, logprobs)

    @staticmethod
    def _logprobs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[TokenLogprobs | None]:
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(rows)
        if wanted:
            ks = [rows[i].params.logprobs for i in wanted]
            for i, lp in zip(wanted, top_logprobs(logits[wanted], ks), strict=True):
                out[i] = lp
        return out

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                greedy: list[bool]) -> torch.Tensor:
        greedy_mask = torch.tensor(greedy, device=logits.device)
        best = argmax(logits)
        probs = sampling_probs(logits, rows)
        noise = self._noise(probs, rows)
        sampled = argmax(probs / noise)
        return torch.where(greedy_mask, best, sampled)

    def _noise(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(rows) if r.generator is not None and not r.params.is_greedy]
        if len(seeded) < len(rows):
            noise.exponential_(generator=self.generator)
        for i in seeded:
            noise[i].exponential_(generator=rows[i].generator)
        return noise


def sampling_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The distribution each row samples from: fp32 logits (logits processors applied) ->
    temperature, top-k, top-p, softmax, min-p (greedy rows keep temperature 1)."""
    temps = [r.params.temperature if not r.params.is_greedy else 1.0 for r in rows]
    logits = logits / torch.tensor(temps, device=logits.device).unsqueeze(1)
    probs = _apply_top_k_top_p(logits, rows).softmax(dim=-1)
    return _apply_min_p(probs, rows)


def _plain_greedy(row: SamplingRow) -> bool:
    """Greedy, and nothing but the argmax is needed: no logprobs, no logits processing."""
    return row.params.is_greedy and row.params.logprobs is None and not processes_logits(row)


def processes_logits(row: SamplingRow) -> bool:
    """min_tokens masking, logit bias or penalties apply to this row."""
    p = row.params
    return bool(row.blocked_token_ids or p.logit_bias or p.needs_penalties)


def _apply_logits_processors(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """min_tokens masking, logit bias, penalties: only touches rows that ask for them."""
    if not any(processes_logits(r) for r in rows):
        return logits
    blocked = [(i, t) for i, r in enumerate(rows) for t in r.blocked_token_ids]
    bias = [(i, t, b) for i, r in enumerate(rows) for t, b in (r.params.logit_bias or {}).items()]
    penalized = [i for i, r in enumerate(rows) if r.params.needs_penalties]
    logits = logits.clone()
    if bias:
        ri, ti, bv = zip(*bias, strict=True)
        logits[list(ri), list(ti)] += torch.tensor(bv, device=logits.device)
    if penalized:
        logits[penalized] = _apply_penalties(logits[penalized], [rows[i] for i in penalized])
    if blocked:
        ri, ti = zip(*blocked, strict=True)
        logits[list(ri), list(ti)] = float("-inf")
    return logits


def _token_counts(token_lists: Sequence[Sequence[int]], vocab: int,
                  device: torch.device) -> torch.Tensor:
    """[rows, vocab] counts of each token id, built with one scatter_add."""
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    if width:
        padded = torch.full((len(token_lists), width), vocab, dtype=torch.long)
        for i, toks in enumerate(token_lists):
            padded[i, : len(toks)] = torch.as_tensor(toks, dtype=torch.long)
        padded = padded.to(device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    vocab, device = logits.shape[1], logits.device
    out_counts = _token_counts([r.output_token_ids for r in rows], vocab, device)
    prompt_seen = _token_counts([r.prompt_token_ids for r in rows], vocab, device) > 0
    seen = prompt_seen | (out_counts > 0)
    rep = torch.tensor([r.params.repetition_penalty for r in rows], device=device).unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    freq = torch.tensor([r.params.frequency_penalty for r in rows], device=device).unsqueeze(1)
    pres = torch.tensor([r.params.presence_penalty for r in rows], device=device).unsqueeze(1)
    return logits - freq * out_counts - pres * (out_counts > 0).to(logits.dtype)


def _apply_top_k_top_p(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    ps = [r.params.top_p for r in rows]
    use_k, use_p = any(k < vocab for k in ks), any(p < 1.0 for p in ps)
    if not (use_k or use_p):
        return logits
    device = logits.device
    if use_k and not use_p:
        kmax = max(k for k in ks if k < vocab)
        top_vals = logits.topk(kmax, dim=-1).values
        k_idx = torch.tensor(ks, device=device).clamp(max=kmax).sub(1).unsqueeze(1)
        threshold = top_vals.gather(1, k_idx)
        no_k = torch.tensor([k >= vocab for k in ks], device=device).unsqueeze(1)
        threshold = threshold.masked_fill(no_k, float("-inf"))
        return logits.masked_fill(logits < threshold, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    drop = ranks >= torch.tensor(ks, device=device).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before > torch.tensor(ps, device=device).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def _apply_min_p(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    min_ps = [r.params.min_p for r in rows]
    if not any(min_ps):
        return probs
    threshold = torch.tensor(min_ps, device=probs.device).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)
