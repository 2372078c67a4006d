"""Incremental detokenization that never emits a broken UTF-8 sequence.

Each new token is decoded together with a few tokens before it (the "prefix window") and the
difference between the two decodes is the new text. A byte-level tokenizer can split one
character over several tokens; the partial decode then ends in U+FFFD, and that text is held
back until the character is complete, but never for more than a few tokens (a UTF-8
character has at most four bytes): a run of bytes that never completes a character is let
through as U+FFFD (and a run of tokens that decode to nothing is passed over), so that the text decoded per token stays short and detokenizing stays
linear in the output length.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

_PROMPT_CONTEXT = 5  # prompt tokens decoded along with the first outputs (spacing rules)
_REPLACEMENT = "\ufffd"
_MAX_HELD_TOKENS = 6  # longer runs of partial UTF-8 are emitted as U+FFFD


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._tokens: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self.text = ""

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes (may be "" while a character is split)."""
        self._tokens.append(token_id)
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._tokens[self._prefix_offset :])
        complete = len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT)
        if not complete and len(self._tokens) - self._read_offset < _MAX_HELD_TOKENS:
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)


def make_token_decoder(tokenizer: Any, cache_size: int = 65536):
    """A cached id -> text function for the decoded_token field of logprobs."""

    @lru_cache(maxsize=cache_size)
    def decode_token(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    return decode_token
