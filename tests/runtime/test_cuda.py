"""The engine on a CUDA device, through each GPU kernel backend (triton, cupy): greedy tokens
identical to transformers in fp32 with prefix caching, chunked prefill and preemption; bf16
within its rounding; AWQ and GPTQ checkpoints through the low-bit GEMM; beam search and
speculative decoding as on the CPU; every block back at the end. Skipped without CUDA.

The models carry a word-level tokenizer built here, so nothing outside the test is needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from kvpage_runtime import LLM, BeamSearchParams, SamplingParams
from model_helpers import TINY, hf_greedy, random_prompts, save_tiny_model, word_tokenizer
from quant_helpers import AWQ, GPTQ, tiny_quantized

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

VOCAB = TINY["vocab_size"]
EOS = 2
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
# a fixed KV cache (not a fraction of the GPU): test processes may share the device
BASE = dict(device="cuda", max_model_len=256, block_size=16, kv_cache_memory=64 << 20)


def tiny_folder(folder: Path, config: transformers.PretrainedConfig | None = None) -> Path:
    config = config or transformers.LlamaConfig(**TINY, eos_token_id=EOS)
    save_tiny_model(config, folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(params=["triton", "cupy"])
def backend(request, monkeypatch):
    """Every engine of the test runs on this kernel backend (skipped where it cannot)."""
    from kvpage_kernels import KernelBackendUnavailable, select_backend

    try:
        select_backend("cuda", request.param)
    except KernelBackendUnavailable as e:
        pytest.skip(str(e))
    monkeypatch.setenv("KVPAGE_KERNEL_BACKEND", request.param)
    return request.param


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_folder(tmp_path_factory.mktemp("cuda-tiny"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return folder, model.eval()


@pytest.fixture(scope="module")
def prompts():
    head = random_prompts([40], VOCAB, seed=1)[0]  # a shared head for the prefix cache
    tails = random_prompts([3, 17, 1, 30, 9, 25, 5, 12], VOCAB, seed=2)
    return [head + t for t in tails[:4]] + tails[4:]


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    return [hf_greedy(tiny[1], p, NEW_TOKENS).tokens for p in prompts]


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def _all_blocks_free(llm: LLM) -> bool:
    return llm.engine.cache.num_free_blocks == llm.engine.cache.num_blocks


@pytest.mark.parametrize("variant", [
    {},
    {"max_num_batched_tokens": 16},  # prompts chunked over several steps
    {"kv_cache_memory": 20 * 16 * 2 * 3 * 2 * 16 * 4},  # 20 blocks: preemption
], ids=["default", "small-chunks", "preemption"])
def test_fp32_greedy_equals_transformers(backend, tiny, prompts, reference, variant):
    llm = LLM(str(tiny[0]), dtype="float32", **{**BASE, **variant})
    assert llm.engine.runner.model.lm_head.weight.is_cuda
    for _ in range(2):  # the second pass is served from the prefix cache
        assert _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY,
                                    use_tqdm=False)) == reference
    assert _all_blocks_free(llm)
    if "kv_cache_memory" in variant:
        assert llm.engine.num_preemptions > 0
    if not variant:
        assert llm.engine.cache.stats.hit_rate > 0


@torch.inference_mode()
def _greedy_with_gaps(model, prompt: list[int]) -> list[tuple[int, float]]:
    """transformers' greedy tokens on the model's device, each with its top-2 logprob gap."""
    tokens, steps = list(prompt), []
    for _ in range(NEW_TOKENS):
        logits = model(torch.tensor([tokens], device=model.device)).logits[0, -1].float()
        top = torch.log_softmax(logits, -1).topk(2)
        steps.append((int(top.indices[0]), float(top.values[0] - top.values[1])))
        tokens.append(steps[-1][0])
    return steps


def test_bf16_follows_transformers_up_to_its_near_ties(backend, tiny, prompts):
    """bf16 greedy paths agree with transformers' bf16 on the GPU until a step where its two
    best logprobs are within bf16's rounding (0.05), where they may part."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny[0], dtype=torch.bfloat16).to("cuda").eval()
    llm = LLM(str(tiny[0]), dtype="bfloat16", **BASE)
    outs = _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY,
                                use_tqdm=False))
    compared = 0
    for prompt, ours in zip(prompts, outs, strict=True):
        for step, (token, (theirs, gap)) in enumerate(zip(ours, _greedy_with_gaps(model, prompt),
                                                          strict=True)):
            if gap < 0.05:
                break
            assert token == theirs, f"step {step}: {token} vs transformers' {theirs}"
            compared += 1
    assert compared >= len(prompts) * NEW_TOKENS // 2
    assert _all_blocks_free(llm)


@pytest.mark.parametrize("scheme", [AWQ(32), GPTQ(4, 128, sym=True, desc_act=True),
                                    GPTQ(8, 32, sym=False, desc_act=False)],
                         ids=["awq-g32", "gptq-4bit-actorder", "gptq-8bit"])
def test_quantized_checkpoint_equals_transformers(backend, scheme, tmp_path):
    config = transformers.LlamaConfig(**{**TINY, "hidden_size": 256, "intermediate_size": 512,
                                         "num_hidden_layers": 2}, eos_token_id=EOS)
    folder, reference = tiny_quantized(config, scheme, tmp_path, word_tokenizer())
    llm = LLM(str(folder), dtype="float32", **BASE)
    prompts = random_prompts([7, 12, 30], VOCAB)
    outs = _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY,
                                use_tqdm=False))
    model = transformers.AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    assert outs == [hf_greedy(model.eval(), p, NEW_TOKENS).tokens for p in prompts]


def test_beam_search_equals_the_cpu_search(backend, tiny, monkeypatch):
    prompts = random_prompts([5, 12], VOCAB, seed=4)
    params = BeamSearchParams(4, 10)
    searches = {}
    for device in ("cpu", "cuda"):
        with monkeypatch.context() as env:
            if device == "cpu":  # the CPU's own backend
                env.delenv("KVPAGE_KERNEL_BACKEND")
            llm = LLM(str(tiny[0]), dtype="float32", **{**BASE, "device": device,
                                                        "block_size": 4})
            outs = llm.beam_search(prompts, params)
        searches[device] = [[(s.tokens, round(s.score, 4)) for s in o.sequences] for o in outs]
        assert _all_blocks_free(llm)
    assert searches["cuda"] == searches["cpu"]


def test_speculative_decoding_keeps_greedy_tokens(backend, tiny, prompts, reference):
    llm = LLM(str(tiny[0]), dtype="float32", **BASE, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "adaptive": False})
    assert _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY,
                                use_tqdm=False)) == reference
    assert _all_blocks_free(llm)


def test_seeded_sampling_repeats_on_the_gpu(backend, tiny, prompts):
    llm = LLM(str(tiny[0]), dtype="float32", **BASE)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=8,
                            ignore_eos=True)
    first = _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=params,
                                 use_tqdm=False))
    again = _tokens(llm.generate(prompt_token_ids=prompts[:3], sampling_params=params,
                                 use_tqdm=False))
    assert again == first[:3]


def test_lora_mixed_batch_equals_the_cpu_engine(backend, tmp_path, monkeypatch):
    """Two PEFT adapters and the base model in one batch: the same greedy tokens as the
    CPU engine (itself held to transformers + peft in test_lora.py)."""
    from kvpage_runtime import LoRARequest
    from test_lora import ALL, make_adapter

    folder = tiny_folder(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loras = [LoRARequest(f"a{i}", i, str(make_adapter(base, tmp_path / f"a{i}", seed=i, r=8,
                                                      lora_alpha=16, target_modules=ALL)))
             for i in (1, 2)]
    prompts = random_prompts([5, 17, 9, 30, 12, 3], VOCAB, seed=6)
    per_prompt = [None, *loras] * 2
    tokens = {}
    for device in ("cpu", "cuda"):
        with monkeypatch.context() as env:
            if device == "cpu":
                env.delenv("KVPAGE_KERNEL_BACKEND")
            llm = LLM(str(folder), dtype="float32", enable_lora=True, max_loras=2,
                      max_lora_rank=8, **{**BASE, "device": device})
            tokens[device] = _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY,
                                                  use_tqdm=False, lora_request=per_prompt))
        assert _all_blocks_free(llm)
    assert tokens["cuda"] == tokens["cpu"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("executor", ["mp", "ray"])
def test_tensor_parallel_over_nccl_equals_one_gpu(backend, tmp_path, executor):
    """TP=2 over NCCL, a GPU per rank, gives the one-GPU engine's greedy tokens."""
    from test_tensor_parallel import FAMILIES, assert_same_greedy

    if executor == "ray":
        pytest.importorskip("ray")
    config, _ = FAMILIES["llama-tp2"]
    folder = tiny_folder(tmp_path / "llama", config)
    prompts = random_prompts([5, 17, 33, 9], VOCAB)
    params = SamplingParams(temperature=0.0, logprobs=5, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = []
    for size in (1, 2):
        llm = LLM(str(folder), dtype="float32", tensor_parallel_size=size,
                  distributed_executor_backend=executor, **BASE)
        try:
            outputs.append(llm.generate(prompt_token_ids=prompts, sampling_params=params,
                                        use_tqdm=False))
        finally:
            llm.engine.shutdown()
    assert_same_greedy(outputs[1], outputs[0])
