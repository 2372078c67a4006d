"""Multi-LoRA serving against transformers + peft: PEFT adapters made here (random, non-zero
B), kvpage's greedy tokens identical (near-tie rule) and logprobs within 1e-4 in fp32 for
each adapter, with adapters and the base model mixed in one batch, on tiny models of each
family; adapters evicted and reloaded under a small max_loras; prefix-cache entries never
shared across adapters; unsupported adapters refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from kvpage_kernels.fused_decoder import FusedDecoder
from kvpage_runtime import (
    LLM,
    BeamSearchParams,
    InvalidRequestError,
    LoRAAdapterError,
    LoRARequest,
    SamplingParams,
)
from model_helpers import TINY, random_prompts, save_tiny_model, word_tokenizer

peft = pytest.importorskip("peft")

NEW_TOKENS = 10
ATOL = 1e-4
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig arguments: ranks, alphas, rsLoRA, attention only, a rank pattern
ADAPTERS = {
    "all-r8": dict(r=8, lora_alpha=16, target_modules=ALL),
    "qv-r4-rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "mlp-o-r16": dict(r=16, lora_alpha=8, target_modules=["o_proj", "gate_proj", "down_proj"],
                      rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 32}),
}
FAMILIES = {
    "llama": transformers.LlamaConfig(**TINY),
    "qwen2": transformers.Qwen2Config(**TINY),
    "mistral": transformers.MistralConfig(**TINY, sliding_window=8),
    "mixtral": transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
    "qwen3": transformers.Qwen3Config(**TINY, head_dim=16),
    "olmo2": transformers.Olmo2Config(**TINY),
    "gemma3": transformers.Gemma3TextConfig(**TINY, head_dim=16, query_pre_attn_scalar=16,
                                            sliding_window=8, sliding_window_pattern=2),
}


def make_adapter(base: transformers.PreTrainedModel, folder: Path, seed: int, **config) -> Path:
    """A PEFT adapter of ``base`` with random A and B (B non-zero, so the outputs change)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **config))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # larger than PEFT's init, so that every adapter moves the tokens
            param.data.normal_(0, 0.2)
    model.save_pretrained(folder)
    model.unload()  # the base model without the LoRA layers again
    return folder


def _targets(family: str) -> dict[str, dict]:
    """Mixtral's experts are not linear layers PEFT adapts: attention only there."""
    if family != "mixtral":
        return ADAPTERS
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return {name: {**cfg, "target_modules": [t for t in cfg["target_modules"] if t in attention]
                   or attention, "rank_pattern": {}, "alpha_pattern": {}}
            for name, cfg in ADAPTERS.items()}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(model folder, {adapter name: LoRARequest}, {None or name: transformers model})."""
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    folder = save_tiny_model(FAMILIES[request.param], root / "base")
    word_tokenizer().save_pretrained(folder)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loras, models = {}, {None: base.eval()}
    for i, (name, cfg) in enumerate(_targets(request.param).items(), start=1):
        path = make_adapter(base, root / name, seed=i, **cfg)
        loras[name] = LoRARequest(name, i, str(path))
        fresh = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        models[name] = peft.PeftModel.from_pretrained(fresh, path).eval()
    return folder, loras, models


@torch.inference_mode()
def reference(model, prompt: list[int]) -> list[tuple[int, float, float]]:
    """transformers (+ peft) greedy: (token, its logprob, gap to the second best) per step."""
    tokens, steps = list(prompt), []
    for _ in range(NEW_TOKENS):
        logprobs = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), -1)
        top = logprobs.topk(2)
        steps.append((int(top.indices[0]), float(top.values[0]), float(top.values[0] - top.values[1])))
        tokens.append(steps[-1][0])
    return steps


def assert_matches(output, expected: list[tuple[int, float, float]], context: str) -> None:
    """Tokens identical and logprobs within ATOL, up to a genuine near-tie where they may part."""
    completion = output.outputs[0]
    for step, (token, (ref, ref_logprob, gap)) in enumerate(
            zip(completion.token_ids, expected, strict=True)):
        if token != ref:
            assert gap < ATOL, f"{context} step {step}: {token} vs {ref} (gap {gap:.2e})"
            return
        logprob = completion.logprobs[step][token].logprob
        assert abs(logprob - ref_logprob) < ATOL, f"{context} step {step}: {logprob} vs {ref_logprob}"


def test_mixed_batch_equals_transformers_and_peft(family, monkeypatch):
    """Three adapters and the base model in one batch (max_loras 4: one step holds all);
    decode steps run in the fused CPU stack where the family has one, adapters included."""
    folder, loras, models = family
    fused_with_adapters = []
    fused_call = FusedDecoder.__call__

    def spy(self, *args, **kwargs):
        fused_with_adapters.append(args[7] is not None)  # lora_slots
        return fused_call(self, *args, **kwargs)

    monkeypatch.setattr(FusedDecoder, "__call__", spy)
    llm = LLM(str(folder), dtype="float32", device="cpu", enable_lora=True, max_loras=4,
              max_lora_rank=16, max_model_len=128)
    prompts = random_prompts([5, 12, 9, 20, 7, 15, 3, 11], TINY["vocab_size"], seed=3)
    names = [None, *loras] * 2
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False,
                        lora_request=[loras.get(n) for n in names])
    moved = 0
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        expected = reference(models[name], prompt)
        assert_matches(out, expected, f"adapter {name}")
        assert out.lora_request is loras.get(name)
        if name is not None:
            moved += out.outputs[0].token_ids != [t for t, _, _ in reference(models[None], prompt)]
    assert moved >= 3, "the adapters should change some greedy paths"
    assert llm.engine.cache.num_free_blocks == llm.engine.cache.num_blocks
    has_stack = llm.engine.runner.model.model.fused_decoder(llm.engine.runner.kv_caches)
    assert any(fused_with_adapters) == (has_stack is not None)


def test_adapters_evicted_and_reloaded_give_the_same_tokens(family, caplog):
    """max_loras 1 and max_cpu_loras 1: every switch of adapter reloads one from disk."""
    folder, loras, models = family
    llm = LLM(str(folder), dtype="float32", device="cpu", enable_lora=True, max_loras=1,
              max_cpu_loras=1, max_lora_rank=16, max_model_len=128)
    prompts = random_prompts([6, 14, 9], TINY["vocab_size"], seed=5)
    names = list(loras)
    with caplog.at_level("INFO", logger="kvpage_runtime"):
        for _ in range(2):
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False,
                                lora_request=[loras[n] for n in names])
            for prompt, name, out in zip(prompts, names, outs, strict=True):
                assert_matches(out, reference(models[name], prompt), f"adapter {name}")
    assert sum("loaded into slot 0" in r.message for r in caplog.records) >= 6


def test_prefix_cache_entries_stay_with_their_adapter(family):
    folder, loras, models = family
    llm = LLM(str(folder), dtype="float32", device="cpu", enable_lora=True, max_loras=2,
              max_lora_rank=16, max_model_len=128, block_size=4)
    prompt = random_prompts([33], TINY["vocab_size"], seed=9)[0]
    stats = llm.engine.cache.stats
    first, second = list(loras)[:2]
    for step, name in enumerate((first, second, None, first)):
        hits = stats.hits
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, use_tqdm=False,
                           lora_request=loras.get(name))[0]
        assert_matches(out, reference(models[name], prompt), f"adapter {name}")
        # only the repeat of the first adapter finds the prompt's blocks
        assert stats.hits - hits == (step == 3), name


def _peft_folder(tmp_path: Path, **config) -> tuple[Path, Path]:
    folder = save_tiny_model(transformers.LlamaConfig(**TINY), tmp_path / "base")
    word_tokenizer().save_pretrained(folder)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return folder, make_adapter(base, tmp_path / "adapter", seed=0, **config)


def test_unsupported_adapters_are_refused_by_name(tmp_path):
    folder, adapter = _peft_folder(tmp_path, r=8, lora_alpha=8, target_modules=["q_proj"])
    llm = LLM(str(folder), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=4,
              max_model_len=64)
    prompt = [[5, 6, 7]]
    with pytest.raises(LoRAAdapterError, match=r"rank 8 .* above max_lora_rank=4"):
        llm.generate(prompt_token_ids=prompt, lora_request=LoRARequest("a", 1, str(adapter)))
    config = json.loads((adapter / "adapter_config.json").read_text())
    for field, value in [("use_dora", True), ("modules_to_save", ["lm_head"]),
                         ("bias", "all"), ("peft_type", "IA3")]:
        (adapter / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(LoRAAdapterError, match=field):
            llm.generate(prompt_token_ids=prompt, lora_request=LoRARequest("b", 2, str(adapter)))
    with pytest.raises(LoRAAdapterError, match="no adapter_config.json"):
        llm.generate(prompt_token_ids=prompt, lora_request=LoRARequest("c", 3, str(tmp_path)))
    assert not llm.engine.has_unfinished_requests()
    plain = LLM(str(folder), dtype="float32", device="cpu", max_model_len=64)
    with pytest.raises(InvalidRequestError, match="enable_lora=True"):
        plain.generate(prompt_token_ids=prompt, lora_request=LoRARequest("a", 1, str(adapter)))


def test_embedding_adapters_are_refused(tmp_path):
    folder, adapter = _peft_folder(tmp_path, r=4, lora_alpha=8,
                                   target_modules=["q_proj", "embed_tokens"])
    llm = LLM(str(folder), dtype="float32", device="cpu", enable_lora=True, max_model_len=64)
    with pytest.raises(LoRAAdapterError, match="embedding"):
        llm.engine.add_lora(LoRARequest("e", 1, str(adapter)))
    assert llm.engine.list_loras() == []


@pytest.mark.slow
def test_default_model_with_adapters_equals_transformers_and_peft(tmp_path):
    """SmolLM2-135M-Instruct as ``LLM()`` serves it (its low-bit GGUF) with two adapters and
    the base model in one batch, against transformers (the GGUF dequantized) + peft."""
    from engine_fixtures import default_hf_model

    base = default_hf_model()
    configs = {"all-r8": ADAPTERS["all-r8"], "qv-r4-rslora": ADAPTERS["qv-r4-rslora"]}
    loras = {name: LoRARequest(name, i, str(make_adapter(base, tmp_path / name, seed=i, **cfg)))
             for i, (name, cfg) in enumerate(configs.items(), start=1)}
    llm = LLM(dtype="float32", device="cpu", enable_lora=True, max_loras=2, max_lora_rank=8,
              max_model_len=256)
    prompts = [llm.get_tokenizer().encode(text) for text in (
        "The capital of France is", "def fibonacci(n):", "Once upon a time")]
    names = [None, *loras]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False,
                        lora_request=[loras.get(n) for n in names])
    references = {None: [reference(base, p) for p in prompts]}
    wrapped = peft.PeftModel.from_pretrained(base, loras["all-r8"].lora_path, adapter_name="all-r8")
    wrapped.load_adapter(loras["qv-r4-rslora"].lora_path, adapter_name="qv-r4-rslora")
    for name in loras:
        wrapped.set_adapter(name)
        references[name] = [reference(wrapped.eval(), p) for p in prompts]
    for i, (name, out) in enumerate(zip(names, outs, strict=True)):
        assert_matches(out, references[name][i], f"adapter {name}")


def test_an_adapter_removed_midway_serves_its_requests_to_the_end(tmp_path):
    folder, adapter = _peft_folder(tmp_path, r=4, lora_alpha=8, target_modules=ALL)
    lora = LoRARequest("a", 1, str(adapter))
    llm = LLM(str(folder), dtype="float32", device="cpu", enable_lora=True, max_model_len=64)
    prompt = [5, 6, 7, 8]
    expected = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, use_tqdm=False,
                            lora_request=lora)[0].outputs[0].token_ids
    engine = llm.engine
    engine.add_request("r", prompt, GREEDY, lora_request=lora)
    engine.step()
    assert engine.remove_lora(1) and engine.list_loras() == []
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    assert final.error is None and final.outputs[0].token_ids == expected
    with pytest.raises(LoRAAdapterError, match="ids are not reused"):
        engine.add_lora(LoRARequest("b", 1, str(tmp_path / "elsewhere")))
    engine.add_lora(lora)  # the same adapter again is fine
    assert engine.list_loras() == [lora]


def test_beam_search_with_an_adapter_equals_transformers_and_peft(family):
    from test_beam_search import _transformers_beams

    folder, loras, models = family
    name = "all-r8"
    llm = LLM(str(folder), dtype="float32", device="cpu", enable_lora=True, max_loras=2,
              max_lora_rank=16, max_model_len=128, block_size=4)
    prompt = random_prompts([9], TINY["vocab_size"], seed=11)[0]
    out = llm.beam_search([prompt], BeamSearchParams(3, 10), lora_request=loras[name])[0]
    sequences, scores = _transformers_beams(models[name], prompt, 3, 1.0)
    for seq, tokens, score in zip(out.sequences, sequences, scores, strict=True):
        assert seq.tokens == prompt + tokens and abs(seq.score - score) < ATOL
