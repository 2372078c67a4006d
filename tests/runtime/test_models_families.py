"""Qwen3, Qwen3-MoE, OLMo 2, Granite, Phi-3, Gemma 2 and Gemma 3 against transformers, and
split over tensor-parallel ranks.

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
# Gemma: a window shorter than most prompts, scores and logits capped where the caps bite
GEMMA = dict(head_dim=24, sliding_window=12, query_pre_attn_scalar=20)
# Gemma 3: full layers on a scaled RoPE of base 1e6, sliding ones on a plain one of base 1e4
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}


def config(name: str, sizes: dict) -> transformers.PretrainedConfig:
    if name == "qwen3":
        return transformers.Qwen3Config(**sizes, head_dim=24)
    if name == "qwen3-moe":  # eight small experts, two per token; layer 1 dense
        return transformers.Qwen3MoeConfig(**sizes, head_dim=24, num_experts=8,
                                           num_experts_per_tok=2, moe_intermediate_size=48,
                                           mlp_only_layers=[1], norm_topk_prob=True)
    if name == "olmo2":
        return transformers.Olmo2Config(**sizes)
    if name == "phi3":  # fused q/k/v and gate/up in the checkpoint, a window on every layer
        return transformers.Phi3Config(**sizes, sliding_window=12, pad_token_id=0)
    if name == "gemma2":  # layers 0 and 2 slide, 1 attends in full
        return transformers.Gemma2Config(**sizes, **GEMMA, attn_logit_softcapping=2.0,
                                         final_logit_softcapping=4.0)
    if name == "gemma3":  # layers 0 and 1 slide, 2 attends in full
        return transformers.Gemma3TextConfig(**sizes, **GEMMA, sliding_window_pattern=3,
                                             rope_parameters=GEMMA3_ROPE)
    return transformers.GraniteConfig(**sizes, **GRANITE)


FAMILIES = ("qwen3", "qwen3-moe", "olmo2", "granite", "phi3", "gemma2", "gemma3")
CONFIGS = {name: config(name, ODD) for name in FAMILIES}
qwen3 = family_fixture(CONFIGS["qwen3"])
# YaRN past its original context: prompts of 33 tokens and 16 more against 32 positions
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
qwen3_yarn = family_fixture(transformers.Qwen3Config(**ODD, head_dim=24, rope_scaling=YARN))
llama_yarn_mscale = family_fixture(transformers.LlamaConfig(
    **ODD, rope_scaling={**YARN, "mscale": 0.8, "mscale_all_dim": 0.5, "beta_fast": 16}))
olmo2 = family_fixture(CONFIGS["olmo2"])
granite = family_fixture(CONFIGS["granite"])
phi3 = family_fixture(CONFIGS["phi3"])
qwen3_moe = family_fixture(CONFIGS["qwen3-moe"])
gemma2 = family_fixture(CONFIGS["gemma2"])
gemma3 = family_fixture(CONFIGS["gemma3"])
qwen3_moe_unnormalized = family_fixture(transformers.Qwen3MoeConfig(
    **{**CONFIGS["qwen3-moe"].to_dict(), "norm_topk_prob": False, "mlp_only_layers": [],
       "decoder_sparse_step": 2}))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_qwen3_matches_transformers(qwen3, schedule, record_property):
    assert qwen3.loaded.config.qk_norm == "head" and qwen3.loaded.config.head_dim == 24
    record_property("near_ties", qwen3.check(*schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_yarn_past_the_original_context_matches_transformers(qwen3_yarn, schedule,
                                                             record_property):
    assert qwen3_yarn.loaded.config.rope_scaling["rope_type"] == "yarn"
    record_property("near_ties", qwen3_yarn.check(*schedule))


def test_yarn_attention_factor_from_mscales_matches_transformers(llama_yarn_mscale,
                                                                 record_property):
    record_property("near_ties", llama_yarn_mscale.check(*SCHEDULES[0]))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_olmo2_matches_transformers(olmo2, schedule, record_property):
    assert olmo2.loaded.config.norm_placement == "post"
    record_property("near_ties", olmo2.check(*schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_granite_matches_transformers(granite, schedule, record_property):
    assert granite.loaded.config.logits_scaling == 3.0
    record_property("near_ties", granite.check(*schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_qwen3_moe_matches_transformers(qwen3_moe, schedule, record_property):
    config = qwen3_moe.loaded.config
    assert (config.num_experts, config.moe_layers, config.norm_topk_prob) == (8, [0, 2], True)
    record_property("near_ties", qwen3_moe.check(*schedule))


def test_qwen3_moe_every_other_layer_unnormalized_matches_transformers(
        qwen3_moe_unnormalized, record_property):
    config = qwen3_moe_unnormalized.loaded.config
    assert (config.moe_layers, config.norm_topk_prob) == ([1], False)
    record_property("near_ties", qwen3_moe_unnormalized.check(*SCHEDULES[0]))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_phi3_matches_transformers(phi3, schedule, record_property):
    assert phi3.loaded.config.sliding_window == 12
    record_property("near_ties", phi3.check(*schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gemma2_matches_transformers(gemma2, schedule, record_property):
    config = gemma2.loaded.config
    assert (config.sliding_window, config.sliding_window_layers) == (12, [0, 2])
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (2.0, 4.0)
    assert config.cache_sliding_window is None  # layer 1 reads every block
    record_property("near_ties", gemma2.check(*schedule))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gemma3_matches_transformers(gemma3, schedule, record_property):
    config = gemma3.loaded.config
    assert (config.sliding_window_layers, config.qk_norm) == ([0, 1], "head")
    assert (config.rope_theta, config.local_rope_theta) == (1e6, 1e4)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    record_property("near_ties", gemma3.check(*schedule))


# Gemma 3's multimodal checkpoints (4B and up): a vision tower beside the language model
GEMMA3_MULTIMODAL = transformers.Gemma3Config(
    text_config={**ODD, **GEMMA, "sliding_window_pattern": 3, "rope_parameters": GEMMA3_ROPE},
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, image_size=32, patch_size=8),
    mm_tokens_per_image=4)
gemma3_multimodal = family_fixture(GEMMA3_MULTIMODAL)


def test_gemma3_multimodal_checkpoints_serve_their_text_model(gemma3_multimodal,
                                                              record_property):
    config = gemma3_multimodal.loaded.config
    assert config.architecture == "Gemma3ForConditionalGeneration"
    assert (config.sliding_window_layers, config.local_rope_theta) == ([0, 1], 1e4)
    record_property("near_ties", gemma3_multimodal.check(*SCHEDULES[1]))


def test_gemma_configs_without_layer_types_follow_the_sliding_window_pattern():
    """Older config.json files name no layer types: every pattern-th layer attends in full
    (Gemma 2: every second, Gemma 3: every sixth unless ``sliding_window_pattern`` says),
    and Gemma 3's sliding layers rotate by ``rope_local_base_freq``."""
    from kvpage_runtime.loaders.hf_config import model_config_from_hf

    def old_style(name: str, **extra) -> dict:
        raw = {**CONFIGS[name].to_dict(), "num_hidden_layers": 7, **extra}
        for key in ("layer_types", "rope_parameters", "sliding_window_pattern"):
            raw.pop(key, None)
        return raw

    gemma2 = model_config_from_hf(old_style("gemma2", architectures=["Gemma2ForCausalLM"]),
                                  torch.float32)
    assert gemma2.sliding_window_layers == [0, 2, 4, 6]
    gemma3 = model_config_from_hf(old_style(
        "gemma3", architectures=["Gemma3ForCausalLM"], rope_theta=1e6,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_local_base_freq=1e4),
        torch.float32)
    assert gemma3.sliding_window_layers == [0, 1, 2, 3, 4, 6]
    assert (gemma3.rope_theta, gemma3.local_rope_theta, gemma3.local_rope_scaling) == (
        1e6, 1e4, None)
    assert gemma3.rope_scaling == {"rope_type": "linear", "factor": 8.0}


def test_gemma_in_bf16_rounds_the_embedding_scale_to_bf16():
    """transformers multiplies the embeddings by sqrt(hidden_size) as a tensor of the model's
    dtype: sqrt(80) in bf16 is 8.9375, not 8.944."""
    from kvpage_runtime.loaders.hf_config import model_config_from_hf

    raw = {**CONFIGS["gemma2"].to_dict(), "architectures": ["Gemma2ForCausalLM"]}
    assert model_config_from_hf(raw, torch.bfloat16).embedding_multiplier == 8.9375
    assert model_config_from_hf(raw, torch.float32).embedding_multiplier == pytest.approx(
        80 ** 0.5, rel=1e-7)


def test_qwen2_with_full_attention_below_max_window_layers_matches_transformers(
        tmp_path, record_property):
    from family_checks import FamilyCase

    case = FamilyCase(transformers.Qwen2Config(
        **ODD, use_sliding_window=True, sliding_window=12, max_window_layers=1), tmp_path)
    assert case.loaded.config.sliding_window_layers == [1, 2]
    record_property("near_ties", case.check(*SCHEDULES[0]))


@pytest.mark.parametrize("name", FAMILIES)
def test_families_split_over_two_ranks(name, tmp_path):
    """OLMo 2's q/k norms span every head: their statistic is summed over the ranks."""
    split = config(name, {**ODD, "num_attention_heads": 6, "num_key_value_heads": 2,
                          "hidden_size": 96})
    folder = tiny_folder(split, tmp_path / name)
    rows = prompts()
    reference, _, _ = generate(folder, engine_options(split, 1), rows)
    outputs, _, _ = generate(folder, engine_options(split, 2), rows)
    assert_same_greedy(outputs, reference)


@pytest.mark.parametrize("params", [
    {"factor": 4.0, "original_max_position_embeddings": 32},
    {"factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2},
    {"factor": 2.0, "original_max_position_embeddings": 128, "mscale": 0.7,
     "mscale_all_dim": 0.3, "truncate": False},
    {"factor": 4.0, "original_max_position_embeddings": 32, "attention_factor": 1.3},
])
def test_yarn_frequencies_equal_transformers(params):
    from kvpage_runtime.layers.rotary import rope_inv_freq
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(
        **ODD, rope_theta=10000.0, rope_scaling={"rope_type": "yarn", **params})
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    ours, factor = rope_inv_freq(16, 10000.0, {"rope_type": "yarn", **params},
                                 ODD["max_position_embeddings"])
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor)


def test_unsupported_rope_settings_are_refused_by_name():
    from kvpage_runtime.errors import UnsupportedModelError
    from kvpage_runtime.layers.rotary import RotaryEmbedding
    from kvpage_runtime.loaders.hf_config import model_config_from_hf

    raw = {**CONFIGS["qwen3"].to_dict(), "architectures": ["Qwen3ForCausalLM"]}
    raw["rope_parameters"] = {**raw["rope_parameters"], "partial_rotary_factor": 1.5}
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor 1.5"):
        model_config_from_hf(raw, torch.float32)
    with pytest.raises(UnsupportedModelError, match="rope_type 'foo' is not supported"):
        RotaryEmbedding(16, 64, 10000.0, {"rope_type": "foo"}, torch.float32)
