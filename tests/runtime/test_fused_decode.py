"""Decode steps through the fused decoder stack give what the layer modules give: exactly in
fp32, to bf16 rounding in bf16, on the detected CPU tier and on the AVX2 one. A stack that
does not prove itself when it is built (a torch release it was not tested with, a check step
that disagrees with the modules) is not used, and says why."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import transformers
from kvpage_kernels import cpu_isa, fused_decoder
from kvpage_runtime.layers import packed_gemm
from kvpage_runtime.loaders import load_model
from kvpage_runtime.models import fused_decode
from kvpage_runtime.models.fused_decode import ENV_VAR
from model_helpers import TINY, PagedGreedyDriver, random_prompts, save_tiny_model

if fused_decoder.unavailable_reason() is not None:
    pytest.skip(f"fused decoder unavailable: {fused_decoder.unavailable_reason()}",
                allow_module_level=True)

CONFIGS = {
    "llama": transformers.LlamaConfig(**TINY),
    "qwen2": transformers.Qwen2Config(**TINY, tie_word_embeddings=True),  # QKV bias
    "mistral": transformers.MistralConfig(**TINY, sliding_window=6),
    "mixtral": transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
    # three of six experts per token, their weights left as the softmax gives them; layer 1
    # a dense MLP
    "qwen3-moe": transformers.Qwen3MoeConfig(**TINY, head_dim=16, num_experts=6,
                                             num_experts_per_tok=3, moe_intermediate_size=48,
                                             norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen3": transformers.Qwen3Config(**TINY, head_dim=16),  # norms on each q and k head
    "olmo2": transformers.Olmo2Config(**TINY),  # norms after the blocks, q/k norms over all
    "granite": transformers.GraniteConfig(**TINY, embedding_multiplier=6.0,
                                          residual_multiplier=0.5, attention_multiplier=0.09,
                                          logits_scaling=3.0),
    # partial rotary (Phi-4-mini): 12 of each head's 16 values rotate
    "phi3-partial": transformers.Phi3Config(**TINY, partial_rotary_factor=0.75, pad_token_id=0),
    # norms around the blocks, GeGLU, soft-capping, sliding layers between full ones
    "gemma2": transformers.Gemma2Config(**TINY, head_dim=16, sliding_window=6,
                                        query_pre_attn_scalar=20, attn_logit_softcapping=2.0),
    # and q/k norms, the sliding layers on a RoPE of their own
    "gemma3": transformers.Gemma3TextConfig(
        **TINY, head_dim=16, sliding_window=6, sliding_window_pattern=2,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}


@pytest.fixture(autouse=True)
def on_an_intel_cpu(monkeypatch):
    """The bf16 stack runs only where MKL's bf16 GEMM is fast (Intel CPUs): tests run it on
    any CPU (it computes the same everywhere)."""
    monkeypatch.setattr(fused_decode, "cpu_vendor", lambda: "GenuineIntel")


def test_bf16_stays_on_the_modules_off_intel_cpus(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fused_decode, "cpu_vendor", lambda: "AuthenticAMD")
    loaded = load_model(str(save_tiny_model(CONFIGS["llama"], tmp_path)), dtype=torch.bfloat16)
    prompts = random_prompts([5, 9], CONFIGS["llama"].vocab_size)
    _, used, log = greedy_logged(loaded, prompts, caplog, monkeypatch)
    assert not used
    assert log == [(logging.INFO, "decode steps run layer by layer: the stack's bf16 GEMM is "
                    "MKL's, whose fast path needs an Intel CPU (this one: AuthenticAMD): "
                    "oneDNN's per layer is faster here")]


def greedy(loaded, prompts, fused: bool, monkeypatch) -> tuple[list, bool]:
    """Tokens and logprobs of a chunked-prefill-then-decode run, and whether decode was fused."""
    monkeypatch.setenv(ENV_VAR, "1" if fused else "0")
    driver = PagedGreedyDriver(loaded, block_size=4)
    seqs = driver.generate(prompts, 12, prefill_chunks=2, stagger=True)
    used = loaded.model.model.fused_decoder(driver.kv_caches) is not None
    return [(s.tokens, s.logprobs) for s in seqs], used


@pytest.mark.parametrize("family", list(CONFIGS))
def test_fused_decode_is_bit_identical(family, tmp_path, monkeypatch):
    loaded = load_model(str(save_tiny_model(CONFIGS[family], tmp_path)), dtype=torch.float32)
    prompts = random_prompts([5, 17, 9, 2], CONFIGS[family].vocab_size)
    fused, used = greedy(loaded, prompts, True, monkeypatch)
    plain, used_when_off = greedy(loaded, prompts, False, monkeypatch)
    assert fused == plain
    assert used and not used_when_off


@pytest.mark.parametrize("family", ["llama", "olmo2", "qwen3-moe"])
def test_fp32_on_the_avx2_tier_is_bit_identical(family, tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_isa.ENV_VAR, "avx2")
    loaded = load_model(str(save_tiny_model(CONFIGS[family], tmp_path)), dtype=torch.float32)
    prompts = random_prompts([5, 17, 9, 2], CONFIGS[family].vocab_size)
    fused, used = greedy(loaded, prompts, True, monkeypatch)
    plain, _ = greedy(loaded, prompts, False, monkeypatch)
    assert used and fused == plain


def decode_step(loaded, prompts, fused: bool, monkeypatch):
    """Hidden states and KV caches after prefilling ``prompts`` and one decode step."""
    monkeypatch.setenv(ENV_VAR, "1" if fused else "0")
    driver = PagedGreedyDriver(loaded, block_size=4)
    seqs = driver.new_sequences(prompts)
    driver.step([(s, len(s.tokens)) for s in seqs])
    batch = driver.build_batch([(s, 1) for s in seqs])
    hidden = loaded.model(batch, driver.kv_caches)
    assert (loaded.model.model.fused_decoder(driver.kv_caches) is not None) == fused
    return hidden, driver.kv_caches


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("tier", ["detected", "avx2"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "olmo2", "granite", "gemma3",
                                    "mixtral"])
def test_bf16_decode_agrees_to_bf16_rounding(family, tier, tmp_path, monkeypatch):
    """On the avx2 tier the modules multiply by plain bf16 weights (no oneDNN packs)."""
    if tier != "detected":
        monkeypatch.setenv(cpu_isa.ENV_VAR, tier)
    loaded = load_model(str(save_tiny_model(CONFIGS[family], tmp_path)), dtype=torch.bfloat16)
    prompts = random_prompts([5, 17, 9, 2], CONFIGS[family].vocab_size)
    fused, fused_caches = decode_step(loaded, prompts, True, monkeypatch)
    plain, plain_caches = decode_step(loaded, prompts, False, monkeypatch)
    assert fused.dtype == torch.bfloat16
    assert relative_error(fused, plain) < 2e-2
    for (k, v), (k_plain, v_plain) in zip(fused_caches, plain_caches, strict=True):
        assert relative_error(k, k_plain) < 2e-2 and relative_error(v, v_plain) < 2e-2


def fused_log(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name == fused_decode.logger.name]


def greedy_logged(loaded, prompts, caplog, monkeypatch) -> tuple[list, bool, list]:
    """``greedy`` with the stack allowed, and what building it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=fused_decode.logger.name):
        tokens, used = greedy(loaded, prompts, True, monkeypatch)
    return tokens, used, fused_log(caplog)


class CorruptStack(fused_decoder.FusedDecoder):
    """A stack that went wrong: its residual stream picks up noise."""

    def __call__(self, *args):
        out, residual = super().__call__(*args)
        return out, residual + torch.randn_like(residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stack_that_disagrees_with_the_modules_is_not_used(dtype, tmp_path, monkeypatch,
                                                              caplog):
    loaded = load_model(str(save_tiny_model(CONFIGS["llama"], tmp_path)), dtype=dtype)
    prompts = random_prompts([5, 17, 9, 2], CONFIGS["llama"].vocab_size)
    plain, _ = greedy(loaded, prompts, False, monkeypatch)
    monkeypatch.setattr(fused_decode, "FusedDecoder", CorruptStack)
    tokens, used, log = greedy_logged(loaded, prompts, caplog, monkeypatch)
    assert not used and tokens == plain
    assert len(log) == 1 and log[0][0] == logging.WARNING
    assert log[0][1].startswith("decode steps run layer by layer: on a check step the fused "
                                "stack's output differs from the layer modules' by ")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_untested_torch_release_is_not_used_where_the_stack_calls_its_mkl(
        dtype, tmp_path, monkeypatch, caplog):
    """bf16 weights are multiplied by the MKL inside torch, which another release may change;
    fp32 ones by kvpage's own GEMM on its own panels, which no torch release can."""
    monkeypatch.setattr(fused_decode, "TESTED_TORCH", ((1, 0), (1, 13)))
    loaded = load_model(str(save_tiny_model(CONFIGS["llama"], tmp_path)), dtype=dtype)
    prompts = random_prompts([5, 9], CONFIGS["llama"].vocab_size)
    _, used, log = greedy_logged(loaded, prompts, caplog, monkeypatch)
    if dtype == torch.float32:
        assert used and not log
        return
    assert not used
    assert log == [(logging.WARNING, f"decode steps run layer by layer: torch "
                    f"{torch.__version__} is outside the releases the fused stack was tested "
                    "with (1.0 to 1.13)")]


def test_fp32_without_packing_runs_layer_by_layer_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(packed_gemm.ENV_VAR, "0")
    loaded = load_model(str(save_tiny_model(CONFIGS["llama"], tmp_path)), dtype=torch.float32)
    prompts = random_prompts([5, 9], CONFIGS["llama"].vocab_size)
    _, used, log = greedy_logged(loaded, prompts, caplog, monkeypatch)
    assert not used
    assert log == [(logging.INFO, "decode steps run layer by layer: the fp32 stack multiplies "
                    "by packed weights and these are not packed "
                    "(KVPAGE_CPU_WEIGHT_PACKING=0, or neither the cpu kernels nor MKL)")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_check_leaves_the_kv_cache_as_it_was(dtype, tmp_path, monkeypatch, caplog):
    loaded = load_model(str(save_tiny_model(CONFIGS["qwen2"], tmp_path)), dtype=dtype)
    monkeypatch.setenv(ENV_VAR, "1")
    driver = PagedGreedyDriver(loaded, block_size=4)
    for k, v in driver.kv_caches:
        k.normal_(), v.normal_()
    before = [(k.clone(), v.clone()) for k, v in driver.kv_caches]
    with caplog.at_level(logging.INFO, logger=fused_decode.logger.name):
        assert loaded.model.model.fused_decoder(driver.kv_caches) is not None
    assert fused_log(caplog) == []
    for (k, v), (k_before, v_before) in zip(driver.kv_caches, before, strict=True):
        assert torch.equal(k, k_before) and torch.equal(v, v_before)


def short_query_step(loaded, prompts, fused: bool, monkeypatch, query_len: int = 4):
    """Hidden states and KV caches after prefilling all but the last ``query_len`` tokens of
    each prompt, then computing those together (as speculative decoding verifies drafts)."""
    monkeypatch.setenv(ENV_VAR, "1" if fused else "0")
    driver = PagedGreedyDriver(loaded, block_size=4)
    seqs = driver.new_sequences(prompts)
    driver.step([(s, len(s.tokens) - query_len) for s in seqs])
    batch = driver.build_batch([(s, query_len) for s in seqs])
    batch = dataclasses.replace(batch, min_context_len=min(len(p) for p in prompts) - query_len)
    return loaded.model(batch, driver.kv_caches), driver.kv_caches


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_short_queries_after_context_run_fused_one_row_per_token(family, tmp_path, monkeypatch):
    """Each token becomes a sequence of its own whose context ends with it: the same causal
    attention as the modules' (a decode kernel instead of the prefill one: equal to fp32
    rounding), through a sliding window too."""
    loaded = load_model(str(save_tiny_model(CONFIGS[family], tmp_path)), dtype=torch.float32)
    prompts = random_prompts([7, 21, 12, 5], CONFIGS[family].vocab_size)
    fused, fused_caches = short_query_step(loaded, prompts, True, monkeypatch)
    plain, plain_caches = short_query_step(loaded, prompts, False, monkeypatch)
    assert relative_error(fused, plain) < 1e-5
    for (k, v), (k_plain, v_plain) in zip(fused_caches, plain_caches, strict=True):
        assert relative_error(k, k_plain) < 1e-5 and relative_error(v, v_plain) < 1e-5
    modules = loaded.model.model.run_layers
    calls = []
    monkeypatch.setattr(loaded.model.model, "run_layers",
                        lambda *a: calls.append(a[3].max_query_len) or modules(*a))
    short_query_step(loaded, prompts, True, monkeypatch)
    assert 17 in calls and 4 not in calls  # the prefill ran on the modules, the queries fused
