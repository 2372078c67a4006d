"""Incremental detokenization: matches a full decode and never emits broken UTF-8."""

import pytest
from engine_fixtures import default_tokenizer
from kvpage_runtime.engine.detokenizer import IncrementalDetokenizer
from kvpage_runtime.engine.stop import stop_by_string
from kvpage_runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


TEXTS = ["Hello, world! 你好，世界 🙂🚀 naïve café — ok", "  leading spaces\nand\ttabs ünïcödé 𝔘"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) == detok.text == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_character_split_across_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1, "the emoji should take several byte-level tokens"
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.push(t) for t in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🙂"


def test_special_tokens_skipped_or_kept(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("Hi", add_special_tokens=False) + [eos]
    skip = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    keep = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    for t in ids:
        skip.push(t)
        keep.push(t)
    assert skip.text == "Hi"
    assert keep.text == "Hi" + tokenizer.decode([eos])


def test_stop_string_spanning_tokens(tokenizer):
    params = SamplingParams(stop=["STOP here"])
    ids = tokenizer.encode("abc STOP here and more", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    for n, t in enumerate(ids, 1):
        delta = detok.push(t)
        found = stop_by_string(params, detok.text, len(delta), n)
        if found:
            break
    assert found is not None and found.stop_reason == "STOP here"
    assert detok.text[: found.truncate_to] == "abc "
    kept = SamplingParams(stop=["STOP here"], include_stop_str_in_output=True)
    assert stop_by_string(kept, "abc STOP here", 5, 3).truncate_to == len("abc STOP here")


class _CountingTokenizer:
    """Records how many ids each decode call gets."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self._tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize("kind", ["partial utf-8", "skipped special"])
def test_text_that_never_completes_keeps_each_decode_short(tokenizer, kind):
    """2,000 tokens that never form a character (or decode to nothing): each decode stays a
    few tokens long, so detokenizing stays linear in the output length."""
    if kind == "partial utf-8":
        token = tokenizer.encode("🙂", add_special_tokens=False)[0]
    else:
        token = tokenizer.eos_token_id
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, [], skip_special_tokens=True)
    for _ in range(2000):
        detok.push(token)
    assert max(counting.lengths) <= 16
    if kind == "partial utf-8":
        assert detok.text and set(detok.text) == {"\ufffd"}
    else:
        assert detok.text == ""
