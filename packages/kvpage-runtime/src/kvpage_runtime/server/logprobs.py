"""Engine logprobs (per position: ``{token_id: Logprob}``) in OpenAI's two response formats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvpage_runtime.server.protocol import CompletionLogprobs, TokenLogprob, TopLogprob

# JSON has no -inf; a token the sampler ruled out gets this instead (as vLLM does).
_FLOOR = -9999.0


def _value(logprob: float) -> float:
    return max(float(logprob), _FLOOR)


def _token_text(tokenizer: Any, token_id: int, entry: Any | None) -> str:
    decoded = getattr(entry, "decoded_token", None)
    return decoded if decoded is not None else tokenizer.decode([token_id])


def _top(position: dict[int, Any], k: int) -> list[tuple[int, Any]]:
    ranked = sorted(position.items(), key=lambda item: -item[1].logprob)
    return ranked[:k]


def completion_logprobs(
    tokenizer: Any,
    token_ids: Sequence[int],
    positions: Sequence[dict[int, Any] | None],
    k: int,
    text_offset: int = 0,
) -> CompletionLogprobs:
    """The completions format: parallel lists of tokens, their logprobs, top-k dicts and offsets.

    A position with no logprobs (the first prompt token when echoing) gets ``None`` entries.
    """
    result = CompletionLogprobs()
    for token_id, position in zip(token_ids, positions, strict=False):
        sampled = position.get(token_id) if position else None
        text = _token_text(tokenizer, token_id, sampled)
        result.tokens.append(text)
        result.text_offset.append(text_offset)
        text_offset += len(text)
        if position is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(_value(sampled.logprob) if sampled else None)
        top = {_token_text(tokenizer, t, lp): _value(lp.logprob) for t, lp in _top(position, k)}
        if sampled is not None:
            top.setdefault(text, _value(sampled.logprob))
        result.top_logprobs.append(top)
    return result


def chat_logprobs(
    tokenizer: Any, token_ids: Sequence[int], positions: Sequence[dict[int, Any] | None], k: int
) -> list[TokenLogprob]:
    """The chat format: one entry per generated token with its ``top_logprobs`` list."""
    entries = []
    for token_id, position in zip(token_ids, positions, strict=False):
        position = position or {}
        sampled = position.get(token_id)
        text = _token_text(tokenizer, token_id, sampled)
        top = [
            TopLogprob(
                token=(t_text := _token_text(tokenizer, t, lp)),
                logprob=_value(lp.logprob),
                bytes=list(t_text.encode()),
            )
            for t, lp in _top(position, k)
        ]
        entries.append(
            TokenLogprob(
                token=text,
                logprob=_value(sampled.logprob) if sampled else _FLOOR,
                bytes=list(text.encode()),
                top_logprobs=top,
            )
        )
    return entries
