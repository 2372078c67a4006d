"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF with a Q8_0 embedding table) against
transformers loading the same file: kvpage keeps its weights low-bit, transformers
dequantizes them to fp32."""

from __future__ import annotations

import time

import pytest
import torch
from engine_fixtures import default_hf_model, default_tokenizer
from kvpage_kernels import cpu_isa
from kvpage_runtime.layers.linear import Linear
from kvpage_runtime.layers.quantization import gguf as gguf_blocks
from kvpage_runtime.layers.quantization import low_bit
from kvpage_runtime.layers.quantization.low_bit import LowBitLinearMethod
from kvpage_runtime.loaders import cache, load_model
from kvpage_runtime.loaders.default_model import default_model_path
from kvpage_runtime.models.weights import resident_weight_bytes
from model_helpers import PagedGreedyDriver, one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Give me a short motivational quote.",
    "What is 12 times 13?",
]


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return default_model_path()
    except Exception as e:  # the optional default model is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def kvpage_fp32(gguf_path):
    """Loaded twice: the first load converts the GGUF unless the cache has it, the second reads the cache."""
    start = time.perf_counter()
    first = load_model(None, dtype="float32")
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    cached = load_model(None, dtype="float32")
    print(f"default model load: first {first_s:.1f} s, cached {time.perf_counter() - start:.1f} s")
    return first, cached


@pytest.fixture(scope="module")
def hf_reference(gguf_path):
    """transformers' tokenizer and batched greedy continuations (left padding), computed once."""
    tokenizer, model = default_tokenizer(), default_hf_model()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in QUESTIONS
    ]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad,
        )
    eos = {tokenizer.eos_token_id}
    return tokenizer, prompts, [_until_eos(row[width:].tolist(), eos) for row in out]


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def test_tokenizer_and_template_match_transformers(kvpage_fp32, hf_reference):
    hf_tokenizer, prompts, _ = hf_reference
    for loaded in kvpage_fp32:
        assert loaded.chat_template == hf_tokenizer.chat_template
        assert loaded.eos_token_ids == {hf_tokenizer.eos_token_id}
        ours = [
            loaded.tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True
            )
            for q in QUESTIONS
        ]
        ours = [p["input_ids"] if hasattr(p, "keys") else p for p in ours]
        assert ours == prompts


def test_cached_weights_equal_first_load(kvpage_fp32):
    first, cached = kvpage_fp32
    assert first.config == cached.config
    ours, theirs = first.model.export_state(), cached.model.export_state()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_weights_stay_low_bit(kvpage_fp32):
    """Every linear layer and the embedding table (the tied LM head) stay packed low-bit:
    the weights take their packed size in memory (norms aside), under a quarter of fp32."""
    model = kvpage_fp32[1].model
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(isinstance(m.method, LowBitLinearMethod) for m in layers)
    assert {m.packed.bits for m in layers} == {4, 8}  # Q4_1 layers, the Q8_0 table
    packed = sum(m.packed.nbytes for m in layers)
    assert resident_weight_bytes(model) <= 1.1 * packed
    assert packed < sum(4 * m.input_size * m.output_size for m in layers) / 4


def test_warm_start_reads_the_cache_without_converting(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    first = load_model(None, dtype="float32")

    def refuse(*args, **kwargs):
        raise AssertionError("a warm start converted a weight")

    monkeypatch.setattr(gguf_blocks, "gguf_weight", refuse)
    monkeypatch.setattr(low_bit, "pack_weight", refuse)
    warm = load_model(None, dtype="float32")
    ours, theirs = first.model.export_state(), warm.model.export_state()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_dense_load_stays_available(kvpage_fp32):
    """``quantization="none"``: every tensor dequantized at load, as before, same tokens."""
    dense = load_model(None, dtype="float32", quantization="none")
    assert not any(isinstance(m.method, LowBitLinearMethod)
                   for m in dense.model.modules() if isinstance(m, Linear))
    prompt = dense.tokenizer.encode("The capital of France is")
    tokens = [PagedGreedyDriver(loaded, max_len=64, max_seqs=1).generate([prompt], 8)[0].tokens
              for loaded in (dense, kvpage_fp32[1])]
    assert tokens[0] == tokens[1]


def test_greedy_matches_transformers(kvpage_fp32, hf_reference):
    _, prompts, expected = hf_reference
    loaded = kvpage_fp32[1]
    seqs = PagedGreedyDriver(loaded, block_size=16, max_len=256, max_seqs=len(prompts)).generate(
        prompts, NEW_TOKENS
    )
    for prompt, seq, reference in zip(prompts, seqs, expected, strict=True):
        generated = _until_eos(seq.tokens[len(prompt) :], loaded.eos_token_ids)
        assert generated == reference


@pytest.mark.parametrize("tier", ["detected", "avx2"])
def test_bfloat16_generates_text(kvpage_fp32, tier, monkeypatch):
    """On the avx2 tier (as on an AMD Zen 3) bf16 weights are multiplied unpacked."""
    if tier != "detected":
        monkeypatch.setenv(cpu_isa.ENV_VAR, tier)
    loaded = load_model(None, dtype="bfloat16")
    assert loaded.model.model.norm.weight.dtype == torch.bfloat16
    prompt = loaded.tokenizer.encode("The capital of France is")
    seq = PagedGreedyDriver(loaded, max_len=64, max_seqs=1).generate([prompt], 8)[0]
    assert "Paris" in loaded.tokenizer.decode(seq.tokens[len(prompt) :])
