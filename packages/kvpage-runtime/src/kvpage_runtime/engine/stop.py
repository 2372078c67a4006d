"""Stop conditions of one sequence: EOS, stop token ids, stop strings, min/max tokens."""

from __future__ import annotations

from dataclasses import dataclass

from kvpage_runtime.sampling.params import SamplingParams


@dataclass(frozen=True)
class StopDecision:
    finish_reason: str  # "stop" | "length"
    stop_reason: str | int | None = None
    truncate_to: int | None = None  # cut the text here (a stop string was found)


def stop_by_token(params: SamplingParams, token_id: int, num_output: int,
                  eos_token_ids: frozenset[int]) -> StopDecision | None:
    """EOS or a stop token id, honoured once min_tokens outputs exist."""
    if num_output < params.min_tokens:
        return None
    if not params.ignore_eos and token_id in eos_token_ids:
        return StopDecision("stop")
    if token_id in params.stop_token_ids:
        return StopDecision("stop", token_id)
    return None


def stop_by_string(params: SamplingParams, text: str, num_new_chars: int,
                   num_output: int) -> StopDecision | None:
    """Finds the first stop string that the last ``num_new_chars`` characters complete.

    A stop string may span tokens, so the search starts far enough back to catch one that began
    in earlier text.
    """
    if not params.stop_strings or num_new_chars == 0 or num_output < params.min_tokens:
        return None
    longest = max(len(s) for s in params.stop_strings)
    start = max(0, len(text) - num_new_chars - longest + 1)
    best: tuple[int, str] | None = None
    for stop in params.stop_strings:
        idx = text.find(stop, start)
        if idx >= 0 and (best is None or idx < best[0]):
            best = (idx, stop)
    if best is None:
        return None
    idx, stop = best
    end = idx + len(stop) if params.include_stop_str_in_output else idx
    return StopDecision("stop", stop, truncate_to=end)


def stop_by_length(params: SamplingParams, num_output: int, num_tokens: int,
                   max_model_len: int) -> StopDecision | None:
    if num_output >= params.max_tokens or num_tokens >= max_model_len:
        return StopDecision("length")
    return None


def held_back_chars(params: SamplingParams) -> int:
    """Characters kept from a stream while unfinished: they could begin a stop string."""
    if not params.stop_strings:
        return 0
    return max(len(s) for s in params.stop_strings) - 1
