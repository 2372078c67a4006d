"""Llama family (Llama 2, Llama 3 with rope scaling, SmolLM2-style tied embeddings) vs transformers."""

import pytest
import transformers
from family_checks import SCHEDULES, family_fixture
from model_helpers import TINY, one_torch_thread  # noqa: F401 (fixture)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

llama2 = family_fixture(transformers.LlamaConfig(**TINY, head_dim=32))
llama3 = family_fixture(
    transformers.LlamaConfig(
        **TINY, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True
    )
)
llama_linear_rope = family_fixture(
    transformers.LlamaConfig(**TINY, rope_scaling={"rope_type": "linear", "factor": 2.0})
)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_llama2_matches_transformers(llama2, schedule, record_property):
    record_property("near_ties", llama2.check(*schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_llama3_rope_scaling_tied_matches_transformers(llama3, schedule, record_property):
    assert llama3.loaded.config.rope_scaling["rope_type"] == "llama3"
    assert llama3.loaded.config.tie_word_embeddings
    record_property("near_ties", llama3.check(*schedule))


def test_llama_linear_rope_matches_transformers(llama_linear_rope, record_property):
    record_property("near_ties", llama_linear_rope.check(*SCHEDULES[0]))
