"""Decode steps through the fused decoder stack give what the layer modules give: exactly in
fp32, to bf16 rounding in bf16."""

from __future__ import annotations

import pytest
import torch
import transformers
from kvpage_kernels import fused_decoder
from kvpage_runtime.loaders import load_model
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
}


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
    assert not used_when_off
    assert used == (family != "mixtral")  # experts keep the per-layer path


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


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_decode_agrees_to_bf16_rounding(family, tmp_path, monkeypatch):
    loaded = load_model(str(save_tiny_model(CONFIGS[family], tmp_path)), dtype=torch.bfloat16)
    prompts = random_prompts([5, 17, 9, 2], CONFIGS[family].vocab_size)
    fused, fused_caches = decode_step(loaded, prompts, True, monkeypatch)
    plain, plain_caches = decode_step(loaded, prompts, False, monkeypatch)
    assert fused.dtype == torch.bfloat16
    assert relative_error(fused, plain) < 2e-2
    for (k, v), (k_plain, v_plain) in zip(fused_caches, plain_caches, strict=True):
        assert relative_error(k, k_plain) < 2e-2 and relative_error(v, v_plain) < 2e-2
