"""GGUF files of Qwen3, Qwen3-MoE, Phi-3 (and Phi-4-mini's partial rotary), OLMo 2, Granite,
Gemma 2 and Gemma 3, written as llama.cpp's converter writes them
(``test_loaders_gguf.write_gguf``: its metadata keys, its tensor names, Granite's Q/K rows
permuted, Qwen3-MoE's experts stacked, Phi-3's fused q/k/v and gate/up, Gemma's norm weights
plus one).

Each loads to the config and the weights of the safetensors original and decodes as
transformers does on that original (greedy tokens identical, logprobs within 1e-4); where
transformers reads the architecture's GGUF files itself, it reads the same weights from ours.
Low-bit files keep their blocks (fused and expert layers too) and decode as their dense load.
"""

from __future__ import annotations

import dataclasses
import json
import math

import gguf
import numpy as np
import pytest
import torch
import transformers
from family_checks import SCHEDULES, FamilyCase
from kvpage_runtime.config import ModelConfig
from kvpage_runtime.errors import ModelLoadError, UnsupportedModelError
from kvpage_runtime.loaders.gguf_file import GGUFModelFile
from kvpage_runtime.loaders.hf_config import model_config_from_hf
from model_helpers import (  # noqa: F401 (fixture)
    PagedGreedyDriver,
    one_torch_thread,
    random_prompts,
    save_tiny_model,
)
from test_loaders_gguf import add_llama_cpp_metadata, write_gguf
from test_models_families import CONFIGS, GEMMA3_ROPE, ODD
from test_models_quantized import load_gguf_weights, low_bit_layers

# every layer a mixture of experts: llama.cpp's qwen3moe has no dense layers
QWEN3_MOE = dict(head_dim=24, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                 norm_topk_prob=True)
# family -> (llama.cpp architecture, config, whether its converter permutes Q/K rows)
FAMILIES = {
    "qwen3": ("qwen3", CONFIGS["qwen3"], False),
    "qwen3-moe": ("qwen3moe", transformers.Qwen3MoeConfig(**ODD, **QWEN3_MOE), False),
    "phi3": ("phi3", CONFIGS["phi3"], False),
    "olmo2": ("olmo2", CONFIGS["olmo2"], False),
    "granite": ("granite", CONFIGS["granite"], True),  # GraniteModel derives from LlamaModel
    # Phi-4-mini's partial rotary: RoPE over the first 3/4 of each head
    "phi3-partial-rotary": ("phi3", transformers.Phi3Config(
        **ODD, sliding_window=12, pad_token_id=0, partial_rotary_factor=0.75), False),
    # Gemma as llama.cpp has it: query_pre_attn_scalar = head_dim (below 27B); Gemma 3's
    # fixed pattern of five sliding layers to a full one and local RoPE base of 1e4
    "gemma2": ("gemma2", transformers.Gemma2Config(
        **ODD, head_dim=24, sliding_window=12, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=4.0), False),
    "gemma3": ("gemma3", transformers.Gemma3TextConfig(
        **{**ODD, "num_hidden_layers": 6}, head_dim=24, sliding_window=12,
        query_pre_attn_scalar=24, rope_parameters=GEMMA3_ROPE), False),
}
# rows of whole Q4_0/Q8_0 blocks (inputs of 96 and 160; experts of 64)
BLOCKS = {**ODD, "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
          "intermediate_size": 160}
LOW_BIT = {
    "phi3-q8_0": ("phi3", transformers.Phi3Config(**BLOCKS, sliding_window=12, pad_token_id=0),
                  "Q8_0"),
    "qwen3-moe-q4_0": ("qwen3moe", transformers.Qwen3MoeConfig(
        **BLOCKS, **{**QWEN3_MOE, "head_dim": 16, "moe_intermediate_size": 64}), "Q4_0"),
}


class GGUFCase(FamilyCase):
    """A family's tiny model, its transformers references, its safetensors load
    (``safetensors``) and its GGUF file loaded as ``load_model`` loads one (``loaded``)."""

    def __init__(self, name: str, folder) -> None:
        arch, config, permute = FAMILIES[name]
        super().__init__(config, folder)
        self.safetensors = self.loaded
        self.path = write_gguf(folder, folder / f"{name}.gguf", arch, config, permute)
        self.loaded = load_gguf_weights(self.path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request, tmp_path_factory) -> GGUFCase:
    return GGUFCase(request.param, tmp_path_factory.mktemp(request.param))


def as_gguf_stores(config: ModelConfig) -> ModelConfig:
    """``config`` as a GGUF file holds it: its floats in fp32 (but the softmax scale, which
    Gemma's files do not store), Qwen3-MoE's expert layers (which config.json lists) all of
    them, as llama.cpp has them (None), and no norm offset (Gemma's is in its weights)."""
    floats = {f.name: float(np.float32(v)) for f in dataclasses.fields(config)
              if isinstance(v := getattr(config, f.name), float)
              and not (f.name == "attention_multiplier" and config.norm_offset)}
    all_moe = config.moe_layers == list(range(config.num_layers))
    return dataclasses.replace(config, **{**floats, "norm_offset": 0.0},
                               moe_layers=None if all_moe else config.moe_layers)


def test_gguf_config_equals_safetensors(case):
    assert case.loaded.config == as_gguf_stores(case.safetensors.config)


def test_gguf_weights_equal_safetensors(case):
    ours, theirs = case.loaded.model.state_dict(), case.safetensors.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gguf_matches_transformers(case, schedule, record_property):
    record_property("near_ties", case.check(*schedule))


def test_transformers_reads_the_same_weights(case):
    """transformers' own GGUF reader (names from the gguf package's table, its own Q/K
    un-permutation where it has one) gives the original's tensors back."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    reference = transformers.AutoModelForCausalLM.from_pretrained(case.folder)
    try:
        tensors = load_gguf_checkpoint(str(case.path), return_tensors=True,
                                       model_to_load=reference)["tensors"]
    except ValueError as e:
        if "is not supported yet" not in str(e):
            raise
        pytest.skip(f"transformers reads no such GGUF: {e}")
    tied = reference.config.tie_word_embeddings
    expected = {name: t for name, t in reference.state_dict().items()
                if not (tied and name == "lm_head.weight")}
    assert tensors.keys() == expected.keys()
    shifted = case.loaded.config.architecture.startswith("Gemma")
    for name, tensor in tensors.items():
        if shifted and name.endswith("norm.weight"):  # it subtracts the one stored: in fp32
            expected[name] = expected[name] + 1 - 1
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("name", LOW_BIT)
def test_low_bit_gguf_keeps_fused_and_expert_blocks(name, tmp_path):
    """Phi-3's fused q/k/v and gate/up are cut into their projections' blocks, Qwen3-MoE's
    experts out of their stacks: all stay low-bit (the router dense) and decode as kvpage's
    dense load of the same file, which the tests above check against transformers."""
    arch, config, qtype = LOW_BIT[name]
    folder = save_tiny_model(config, tmp_path / "dense")
    path = write_gguf(folder, tmp_path / f"{name}.gguf", arch, config, False, {"*": qtype})
    low_bit, dense = load_gguf_weights(path), load_gguf_weights(path, low_bit=False)
    layers = low_bit_layers(low_bit.model)
    assert not any(low_bit_layers(dense.model).values())
    assert {layer for layer, kept in layers.items() if not kept} <= {
        f"model.layers.{i}.mlp.gate" for i in range(config.num_hidden_layers)}
    prompts = random_prompts([5, 17, 33, 9], config.vocab_size)
    ours, theirs = (PagedGreedyDriver(m, block_size=8).generate(prompts, 12)
                    for m in (low_bit, dense))
    for a, b in zip(ours, theirs, strict=True):
        assert a.tokens == b.tokens
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_phi3_longrope_factors_become_its_rope_scaling(tmp_path):
    """llama.cpp keeps LongRoPE's factors as tensors and its attention factor as metadata:
    read back, they make the rope scaling of config.json (the factors in fp32), with the
    attention factor transformers would compute."""
    factors = {"long_factor": [1 + i / 7 for i in range(8)],
               "short_factor": [1 + i / 31 for i in range(8)]}
    config = transformers.Phi3Config(
        **{**ODD, "max_position_embeddings": 512}, original_max_position_embeddings=128,
        pad_token_id=0, rope_scaling={"rope_type": "longrope", **factors})
    folder = save_tiny_model(config, tmp_path / "phi3")
    gguf_file = GGUFModelFile(write_gguf(folder, tmp_path / "phi3.gguf", "phi3", config, False))
    ours = gguf_file.model_config(torch.float32).rope_scaling
    raw = json.loads((folder / "config.json").read_text())
    expected = model_config_from_hf(raw, torch.float32).rope_scaling
    assert expected == {"rope_type": "longrope", "original_max_position_embeddings": 128,
                        **factors}
    assert ours == {**expected, **{key: pytest.approx(values) for key, values in factors.items()},
                    "attention_factor": pytest.approx(math.sqrt(1 + math.log(4) / math.log(128)))}
    assert not any("rope_factors" in name for name in gguf_file.tensor_types())


def _written(writer: gguf.GGUFWriter) -> GGUFModelFile:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFModelFile(writer.path)


def _metadata_only(path, arch: str, config, extra) -> GGUFModelFile:
    """A GGUF of ``config``'s metadata (and ``extra``'s keys) and its embedding table alone."""
    writer = gguf.GGUFWriter(str(path), arch)
    add_llama_cpp_metadata(writer, arch, config)
    extra(writer)
    writer.add_tensor("token_embd.weight",
                      np.zeros((config.vocab_size, config.hidden_size), dtype=np.float32))
    return _written(writer)


REFUSED = {
    "yarn-extrapolation-factor": (
        "qwen3", CONFIGS["qwen3"],
        lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
                   w.add_rope_scaling_factor(4.0), w.add_rope_scaling_orig_ctx_len(32),
                   w.add_rope_scaling_yarn_ext_factor(0.5)),
        UnsupportedModelError, "qwen3.rope.scaling.yarn_ext_factor = 0.5 is not supported"),
    # OLMo 3, which llama.cpp writes as an olmo2 with its layers' kinds
    "window-pattern": ("olmo2", CONFIGS["olmo2"],
                       lambda w: (w.add_sliding_window(8), w.add_sliding_window_pattern(
                           [True, True, False])), UnsupportedModelError,
                       "olmo2.attention.sliding_window_pattern"),
    "longrope-without-short-factors": (
        "phi3", CONFIGS["phi3"],
        lambda w: w.add_tensor("rope_factors_long.weight", np.ones(8, dtype=np.float32)),
        ModelLoadError, "lacks the rope_factors_short.weight tensor"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_or_incomplete_files_are_refused_by_name(name, tmp_path):
    arch, config, extra, error, message = REFUSED[name]
    gguf_file = _metadata_only(tmp_path / "model.gguf", arch, config, extra)
    with pytest.raises(error, match=message):
        gguf_file.model_config(torch.float32)


def test_a_missing_key_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "qwen3")
    writer.add_vocab_size(640)
    writer.add_embedding_length(80)
    writer.add_head_count(5)
    gguf_file = _written(writer)
    with pytest.raises(ModelLoadError, match="lacks the qwen3.block_count metadata"):
        gguf_file.model_config(torch.float32)


def test_yarn_metadata_becomes_its_rope_scaling(tmp_path, record_property):
    """llama.cpp's YaRN keys read back as config.json's rope scaling, and the model decodes
    as transformers does past the original context (prompts of 33 tokens and 16 more
    against 32 positions)."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
            "attention_factor": 1.25, "beta_fast": 16.0, "beta_slow": 2.0}
    config = transformers.Qwen3Config(**ODD, head_dim=24, rope_scaling=dict(yarn))
    case = FamilyCase(config, tmp_path)
    assert case.loaded.config.rope_scaling == yarn  # read from config.json
    path = write_gguf(tmp_path, tmp_path / "qwen3-yarn.gguf", "qwen3", config, False)
    case.loaded = load_gguf_weights(path)
    assert case.loaded.config.rope_scaling == yarn
    for schedule in SCHEDULES:
        record_property("near_ties", case.check(*schedule))


def test_llama31_rope_scaling_from_its_frequency_factors(tmp_path, record_property):
    """llama.cpp's converter computes Llama 3.1's scaling into a rope_freqs tensor (one
    divisor per frequency; no scaling metadata): read back, it decodes as transformers does
    with the llama3 scaling of config.json (here kept, scaled and blended frequencies all)."""
    config = transformers.LlamaConfig(**ODD, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})
    case = FamilyCase(config, tmp_path)
    path = write_gguf(tmp_path, tmp_path / "llama31.gguf", "llama", config, True)
    case.loaded = load_gguf_weights(path)
    factors = case.loaded.config.rope_scaling["factors"]
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[1] < 8.0
    for schedule in SCHEDULES:
        record_property("near_ties", case.check(*schedule))
