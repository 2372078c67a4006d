"""LLM on the default model (SmolLM2-135M-Instruct): greedy output equals transformers'
generate in fp32; chat applies the tokenizer's template; outputs keep the input order."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import default_hf_model
from kvpage_runtime import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors:\n1."]
MAX_NEW = 16


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=512)


@pytest.fixture(scope="module")
def hf_model():
    return default_hf_model()


@pytest.mark.slow
@torch.no_grad()
def test_greedy_equals_transformers_generate(llm, hf_model):
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist() and out.prompt == prompt
        ref = hf_model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False,
                                min_new_tokens=MAX_NEW)[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].text == tokenizer.decode(ref, skip_special_tokens=True)


@pytest.mark.slow
def test_chat_and_input_order(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    convs = [[{"role": "user", "content": "Say hello."}],
             [{"role": "user", "content": "What is 2 + 2?"}]]
    outputs = llm.chat(convs, params, use_tqdm=False)
    template_ids = llm.get_tokenizer().apply_chat_template(convs[1], add_generation_prompt=True,
                                                           tokenize=True, return_dict=False)
    assert outputs[1].prompt_token_ids == list(template_ids)
    assert all(o.finished and o.outputs[0].text for o in outputs)
    by_ids = llm.generate(prompt_token_ids=[o.prompt_token_ids for o in reversed(outputs)],
                          sampling_params=params, use_tqdm=False)
    assert [o.outputs[0].text for o in by_ids] == [o.outputs[0].text for o in reversed(outputs)]
    assert outputs[0].outputs[0].finish_reason in ("stop", "length")
