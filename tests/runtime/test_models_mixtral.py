"""Mixtral (top-2 of 4 experts, softmax router, renormalized weights) vs transformers."""

import pytest
import transformers
from family_checks import SCHEDULES, family_fixture
from model_helpers import TINY, one_torch_thread  # noqa: F401 (fixture)

mixtral = family_fixture(
    transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mixtral_matches_transformers(mixtral, schedule, record_property):
    assert mixtral.loaded.config.num_experts == 4
    record_property("near_ties", mixtral.check(*schedule))
