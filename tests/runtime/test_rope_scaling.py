"""LongRoPE, dynamic NTK and partial rotary against transformers: their frequencies and
attention factors, and tiny models end to end (greedy tokens and logprobs within 1e-4).

transformers picks LongRoPE's factors and grows the dynamic-NTK base at each forward from the
sequence's length; kvpage chooses once for the model's context (see layers/rotary.py). So
each comparison below is made where transformers' choice for the sequences at hand is
kvpage's static one, as each test states."""

import pytest
import torch
import transformers
from family_checks import SCHEDULES, family_fixture
from kvpage_runtime.layers.rotary import rope_inv_freq
from kvpage_runtime.loaders.hf_config import model_config_from_hf
from model_helpers import TINY, one_torch_thread  # noqa: F401 (fixture)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

ORIGINAL = 32  # the original (pretrained) context of every config here
HEAD_DIM = TINY["hidden_size"] // TINY["num_attention_heads"]  # 16


def _factors(count: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    return (1 + 3 * torch.rand(count, generator=gen)).tolist()


def phi3_longrope(max_positions: int, partial: float = 1.0,
                  **params) -> transformers.Phi3Config:
    """Phi-3 with LongRoPE as its checkpoints state it: original_max_position_embeddings
    beside the scaling, max_position_embeddings the extended context."""
    pairs = int(HEAD_DIM * partial) // 2
    return transformers.Phi3Config(
        **{**TINY, "max_position_embeddings": max_positions}, pad_token_id=0,
        original_max_position_embeddings=ORIGINAL, partial_rotary_factor=partial,
        rope_scaling={"rope_type": "longrope", "short_factor": _factors(pairs, 0),
                      "long_factor": _factors(pairs, 1), **params})


def llama_dynamic(factor: float, partial: float = 1.0) -> transformers.LlamaConfig:
    """Dynamic NTK as its configs state it: max_position_embeddings the original context."""
    return transformers.LlamaConfig(
        **{**TINY, "max_position_embeddings": ORIGINAL}, partial_rotary_factor=partial,
        rope_scaling={"rope_type": "dynamic", "factor": factor})


def kvpage_frequencies(hf_config: transformers.PretrainedConfig):
    """(inverse frequencies, attention factor, ModelConfig) as kvpage loads ``hf_config``."""
    raw = {**hf_config.to_dict(), "architectures": hf_config.architectures
           or [f"{type(hf_config).__name__.removesuffix('Config')}ForCausalLM"]}
    config = model_config_from_hf(raw, torch.float32)
    inv_freq, factor = rope_inv_freq(config.rotary_dim or config.head_dim, config.rope_theta,
                                     config.rope_scaling, config.max_position_embeddings)
    return inv_freq, factor, config


@pytest.mark.parametrize("partial", [1.0, 0.75])
@pytest.mark.parametrize("max_positions, params", [
    (128, {}),  # long: the attention factor from 128 / 32
    (128, {"attention_factor": 1.3}),
    (128, {"factor": 2.0}),  # the attention factor from the stated factor
    (ORIGINAL, {}),  # short: the context is the original one
    (ORIGINAL, {"attention_factor": 0.9}),
])
def test_longrope_frequencies_equal_transformers(max_positions, params, partial):
    """kvpage takes the long factors when the model's context exceeds the original one,
    which transformers does for a sequence that does (and the short ones for the rest)."""
    hf_config = phi3_longrope(max_positions, partial, **params)
    expected, expected_factor = ROPE_INIT_FUNCTIONS["longrope"](
        hf_config, "cpu", seq_len=max_positions)
    ours, factor, config = kvpage_frequencies(hf_config)
    assert config.rope_scaling["rope_type"] == "longrope"
    assert config.rotary_dim == (None if partial == 1.0 else 12)
    assert torch.equal(ours, expected)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


@pytest.mark.parametrize("factor", [2.0, 4.0, 1.5])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_dynamic_ntk_frequencies_equal_transformers_at_the_extended_context(factor, partial):
    """kvpage serves factor times the configured context with the one base transformers
    computes for a sequence of that length (vLLM's static NTK)."""
    hf_config = llama_dynamic(factor, partial)
    ours, attention_factor, config = kvpage_frequencies(hf_config)
    assert config.max_position_embeddings == int(ORIGINAL * factor)
    expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, "cpu",
                                                 seq_len=config.max_position_embeddings)
    assert torch.equal(ours, expected) and attention_factor == 1.0


def test_su_is_longrope_and_partial_rotary_is_read_beside_old_scaling():
    """Phi-3's first 128k configs say "su"; transformers 4 configs keep
    partial_rotary_factor at the top level."""
    hf_config = phi3_longrope(128, 0.75)
    raw = {**hf_config.to_dict(), "architectures": ["Phi3ForCausalLM"],
           "rope_parameters": None, "rope_theta": 10000.0,
           "rope_scaling": {"type": "su", "short_factor": hf_config.rope_parameters["short_factor"],
                            "long_factor": hf_config.rope_parameters["long_factor"]}}
    config = model_config_from_hf(raw, torch.float32)
    assert config.rope_scaling["rope_type"] == "longrope" and config.rotary_dim == 12
    assert config.rope_scaling["original_max_position_embeddings"] == ORIGINAL


def test_longrope_factors_must_cover_the_rotary_dimension():
    from kvpage_runtime.errors import ModelLoadError

    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
               "original_max_position_embeddings": ORIGINAL}
    with pytest.raises(ModelLoadError, match="long_factor holds 8 values; the rotary "
                                             "dimension 12 needs 6"):
        rope_inv_freq(12, 10000.0, scaling, 128)


# Prompts past the original context (the shortest 33 tokens): transformers takes the long
# factors at every step, as kvpage does for a context of 128.
PAST_ORIGINAL = dict(prompt_lengths=[40, 33, 57], new_tokens=12)
phi3_longrope_model = family_fixture(phi3_longrope(128), **PAST_ORIGINAL)
phi3_partial_model = family_fixture(phi3_longrope(128, 0.75), **PAST_ORIGINAL)
# The prompts fill the extended context of 64 exactly: transformers' first step then has the
# base kvpage holds; its later steps would grow it further, so one token is compared.
llama_dynamic_model = family_fixture(llama_dynamic(2.0), prompt_lengths=[64, 64, 64],
                                     new_tokens=1)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_longrope_past_the_original_context_matches_transformers(phi3_longrope_model,
                                                                 schedule, record_property):
    assert phi3_longrope_model.loaded.config.rope_scaling["rope_type"] == "longrope"
    record_property("near_ties", phi3_longrope_model.check(*schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_partial_rotary_longrope_matches_transformers(phi3_partial_model, schedule,
                                                      record_property):
    """Phi-4-mini's layout: 0.75 of each head rotates (12 of 16 values)."""
    assert phi3_partial_model.loaded.config.rotary_dim == 12
    record_property("near_ties", phi3_partial_model.check(*schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dynamic_ntk_at_the_extended_context_matches_transformers(llama_dynamic_model,
                                                                  schedule, record_property):
    assert llama_dynamic_model.loaded.config.max_position_embeddings == 64
    record_property("near_ties", llama_dynamic_model.check(*schedule))
