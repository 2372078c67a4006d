"""Beam search: its parameters, its outputs, and one prompt's search as transformers runs it.

The scoring is that of transformers' ``generate(num_beams=W, do_sample=False,
early_stopping=True, length_penalty=L)``, which differs from vLLM's:

- Each step takes the top ``K`` candidates (``K = max(2, 1 + number of EOS ids) * W``) of all
  live beams together, by raw cumulative log-probability (at the first step only one beam is
  live). Candidates are ranked by ``torch.topk`` over the live beams' rows laid end to end.
- A candidate that ends its beam (an EOS token, or the last token ``max_tokens`` allows)
  becomes a finished hypothesis only if it ranks among the top ``W`` of the ``K``; it is
  scored as its cumulative log-probability divided by (its generated tokens, EOS included) to
  the power ``length_penalty``, and the best ``W`` hypotheses are kept.
- The best ``W`` candidates that do not end are the next step's live beams, ranked by raw
  cumulative log-probability.
- The search ends once ``W`` hypotheses have finished (early stopping), or at ``max_tokens``,
  where every candidate ends, so the live beams' last continuations are scored like the
  finished ones and merged with them.

The search returns its hypotheses best first by normalised score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpage_runtime.errors import InvalidRequestError


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's beam search parameters. ``temperature`` divides the logits before the
    log-probabilities are taken (0 and 1 leave them as they are)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.temperature >= 0.0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature!r}")


@dataclass
class BeamSearchSequence:
    """One hypothesis: ``tokens`` are the prompt's and the generated ones, ``text`` their
    decoding (as in vLLM); ``score`` is the normalised score it was ranked by."""

    tokens: list[int]
    text: str
    cum_logprob: float
    score: float
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class BeamSearchOutput:
    """A prompt's hypotheses, best first."""

    sequences: list[BeamSearchSequence]


@dataclass
class Beam:
    tokens: list[int]  # generated so far
    cum_logprob: float = 0.0


@dataclass
class Hypothesis:
    tokens: list[int]
    cum_logprob: float
    score: float
    finish_reason: str


@dataclass
class Step:
    """What one step of a search decided: the next live beams, each continuing ``parent``
    (an index into the previous live beams) with ``token``."""

    continuations: list[tuple[int, int]] = field(default_factory=list)


def normalized_score(cum_logprob: float, num_tokens: int, length_penalty: float) -> float:
    """A finished hypothesis' score: its cumulative log-probability over its generated tokens
    (EOS included) to the power ``length_penalty``."""
    return cum_logprob / num_tokens**length_penalty


class BeamSearch:
    """One prompt's search; ``advance`` takes the live beams' log-probabilities each step."""

    def __init__(self, params: BeamSearchParams, eos_token_ids: frozenset[int],
                 max_new_tokens: int) -> None:
        self.params = params
        self.eos = frozenset() if params.ignore_eos else eos_token_ids
        self.max_new_tokens = min(params.max_tokens, max_new_tokens)
        self.keep = max(2, 1 + len(self.eos)) * params.beam_width
        self.live = [Beam([])]
        self.finished: list[Hypothesis] = []

    @property
    def done(self) -> bool:
        return not self.live

    def advance(self, logprobs: torch.Tensor) -> Step:
        """``logprobs``: fp32 log-probabilities [len(live), vocab] of each live beam's next
        token, in the order of ``live``. Updates the search; returns the new live beams."""
        width, vocab = self.params.beam_width, logprobs.shape[1]
        cum = torch.tensor([b.cum_logprob for b in self.live], dtype=torch.float32,
                           device=logprobs.device)
        scores = (logprobs + cum[:, None]).reshape(-1)
        values, indices = scores.topk(min(self.keep, scores.numel()))
        generated = len(self.live[0].tokens) + 1
        at_limit = generated >= self.max_new_tokens
        step, new_live, new_finished = Step(), [], []
        for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist(), strict=True)):
            parent, token = divmod(index, vocab)
            tokens = self.live[parent].tokens + [token]
            ends = at_limit or token in self.eos
            if ends and rank < width:
                reason = "stop" if token in self.eos else "length"
                new_finished.append(Hypothesis(
                    tokens, value, normalized_score(value, generated, self.params.length_penalty),
                    reason))
            elif not ends and len(new_live) < width:
                new_live.append(Beam(tokens, value))
                step.continuations.append((parent, token))
        self._add_finished(new_finished)
        self.live = [] if at_limit or len(self.finished) >= width else new_live
        if self.done:
            step.continuations = []
        return step

    def _add_finished(self, hypotheses: list[Hypothesis]) -> None:
        """Keep the best ``beam_width`` (an existing hypothesis wins a tie, as the earlier
        entry of transformers' merged top-k)."""
        merged = self.finished + hypotheses
        order = sorted(range(len(merged)), key=lambda i: (-merged[i].score, i))
        self.finished = [merged[i] for i in order[: self.params.beam_width]]

    def best(self) -> list[Hypothesis]:
        """The finished hypotheses, best first."""
        return list(self.finished)
