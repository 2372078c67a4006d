"""Qwen2 (QKV bias, tied embeddings) vs transformers."""

import pytest
import transformers
from family_checks import SCHEDULES, family_fixture
from model_helpers import TINY, one_torch_thread  # noqa: F401 (fixture)

qwen2 = family_fixture(transformers.Qwen2Config(**TINY, tie_word_embeddings=True))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_qwen2_matches_transformers(qwen2, schedule, record_property):
    config = qwen2.loaded.config
    assert config.attention_bias and config.tie_word_embeddings and config.sliding_window is None
    record_property("near_ties", qwen2.check(*schedule))
