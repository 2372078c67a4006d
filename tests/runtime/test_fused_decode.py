"""Decode steps through the fused decoder stack give exactly what the layer modules give."""

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


def test_not_used_in_bf16(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    loaded = load_model(str(save_tiny_model(CONFIGS["llama"], tmp_path)), dtype=torch.bfloat16)
    driver = PagedGreedyDriver(loaded, block_size=4)
    assert loaded.model.model.fused_decoder(driver.kv_caches) is None
