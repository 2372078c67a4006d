"""Qwen3, OLMo 2 and Granite against transformers, and split over tensor-parallel ranks.

Odd sizes: five query heads over one KV head (a KV group of five), a hidden size that is no
multiple of 64 (80), three layers."""

import pytest
import torch
import transformers
from family_checks import SCHEDULES, family_fixture
from model_helpers import TINY, one_torch_thread  # noqa: F401 (fixture)
from test_tensor_parallel import assert_same_greedy, engine_options, generate, prompts, tiny_folder

ODD = {**TINY, "hidden_size": 80, "num_attention_heads": 5, "num_key_value_heads": 1,
       "intermediate_size": 144}
GRANITE = dict(embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.09,
               logits_scaling=3.0)


def config(name: str, sizes: dict) -> transformers.PretrainedConfig:
    if name == "qwen3":
        return transformers.Qwen3Config(**sizes, head_dim=24)
    if name == "olmo2":
        return transformers.Olmo2Config(**sizes)
    return transformers.GraniteConfig(**sizes, **GRANITE)


CONFIGS = {name: config(name, ODD) for name in ("qwen3", "olmo2", "granite")}
qwen3 = family_fixture(CONFIGS["qwen3"])
olmo2 = family_fixture(CONFIGS["olmo2"])
granite = family_fixture(CONFIGS["granite"])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_qwen3_matches_transformers(qwen3, schedule, record_property):
    assert qwen3.loaded.config.qk_norm == "head" and qwen3.loaded.config.head_dim == 24
    record_property("near_ties", qwen3.check(*schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_olmo2_matches_transformers(olmo2, schedule, record_property):
    assert olmo2.loaded.config.post_norm
    record_property("near_ties", olmo2.check(*schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_granite_matches_transformers(granite, schedule, record_property):
    assert granite.loaded.config.logits_scaling == 3.0
    record_property("near_ties", granite.check(*schedule))


@pytest.mark.parametrize("name", ["qwen3", "olmo2", "granite"])
def test_families_split_over_two_ranks(name, tmp_path):
    """OLMo 2's q/k norms span every head: their statistic is summed over the ranks."""
    split = config(name, {**ODD, "num_attention_heads": 6, "num_key_value_heads": 2,
                          "hidden_size": 96})
    folder = tiny_folder(split, tmp_path / name)
    rows = prompts()
    reference, _, _ = generate(folder, engine_options(split, 1), rows)
    outputs, _, _ = generate(folder, engine_options(split, 2), rows)
    assert_same_greedy(outputs, reference)


def test_decode_steps_run_layer_by_layer(olmo2, caplog):
    from kvpage_runtime.models.fused_decode import build_fused_decoder

    caches = [(torch.zeros(4, 16, 1, 16), torch.zeros(4, 16, 1, 16))
              for _ in range(olmo2.loaded.config.num_layers)]
    with caplog.at_level("INFO"):
        assert build_fused_decoder(olmo2.loaded.model.model, caches) is None
    assert "the fused stack has no query and key norms" in caplog.text
