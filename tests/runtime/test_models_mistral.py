"""Mistral (GQA, sliding window smaller than prompt + generation) vs transformers."""

import pytest
import transformers
from family_checks import NEW_TOKENS, PROMPT_LENGTHS, SCHEDULES, family_fixture
from model_helpers import TINY, one_torch_thread  # noqa: F401 (fixture)

WINDOW = 12
assert max(PROMPT_LENGTHS) > WINDOW and WINDOW < NEW_TOKENS

mistral = family_fixture(transformers.MistralConfig(**TINY, sliding_window=WINDOW))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mistral_sliding_window_matches_transformers(mistral, schedule, record_property):
    assert mistral.loaded.config.sliding_window == WINDOW
    record_property("near_ties", mistral.check(*schedule))
