"""The engine on a tiny random-weight Llama: greedy parity with transformers under every
scheduling regime, sampling features, stops, logprobs, aborts and request validation."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import make_tiny_model_dir
from kvpage_runtime import LLM, InvalidRequestError, SamplingParams
from kvpage_runtime.engine.config import EngineConfig
from kvpage_runtime.engine.engine import LLMEngine
from kvpage_runtime.errors import EngineConfigError
from model_helpers import hf_greedy, random_prompts

VOCAB = 640
MAX_NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
BASE = dict(dtype="float32", device="cpu", max_model_len=256, block_size=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(str(tiny[0]), **BASE)


@pytest.fixture(scope="module")
def prompts():
    # shared 40-token head so that prefix caching has something to hit
    head = random_prompts([40], VOCAB, seed=1)[0]
    tails = random_prompts([3, 17, 1, 30, 9, 25, 5, 12], VOCAB, seed=2)
    return [head + t for t in tails[:4]] + tails[4:]


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    return [hf_greedy(tiny[1], p, MAX_NEW).tokens for p in prompts]


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"enable_prefix_caching": False},
        {"enable_chunked_prefill": False},
        {"max_num_batched_tokens": 16},  # prompts chunked over several steps
        {"kv_cache_memory": 20 * 16 * 2 * 3 * 2 * 16 * 4},  # 20 blocks: preemption
    ],
    ids=["default", "no-prefix-cache", "no-chunked-prefill", "small-chunks", "preemption"],
)
def test_greedy_matches_transformers(tiny, prompts, reference, variant):
    llm = LLM(str(tiny[0]), **{**BASE, **variant})
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == reference
    # again: the second pass is served from the prefix cache where enabled
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == reference
    if "kv_cache_memory" in variant:
        assert llm.engine.num_preemptions > 0
    if variant == {}:
        assert llm.engine.cache.stats.hit_rate > 0


def test_batch_of_one_equals_batch_of_32(llm):
    prompts = random_prompts([5 + (i * 7) % 40 for i in range(32)], VOCAB, seed=3)
    batched = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    single = [_tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts[:4]]
    assert batched[:4] == single


def test_seeded_sampling_ignores_batch_companions(llm, prompts):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=MAX_NEW, ignore_eos=True)
    alone = _tokens(llm.generate([prompts[0]], seeded, use_tqdm=False))[0]
    others = SamplingParams(temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True)
    mixed = llm.generate(prompts, [seeded] + [others] * (len(prompts) - 1), use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone
    again = llm.generate(prompts[3:] + prompts[:1], [others] * 5 + [seeded], use_tqdm=False)
    assert again[-1].outputs[0].token_ids == alone


def test_n_completions_are_distinct_and_share_the_prompt(llm, prompts):
    params = SamplingParams(n=4, temperature=1.5, max_tokens=MAX_NEW, ignore_eos=True, seed=7)
    (out,) = llm.generate([prompts[1]], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    completions = {tuple(c.token_ids) for c in out.outputs}
    assert len(completions) == 4
    assert all(len(c.token_ids) == MAX_NEW and c.finish_reason == "length" for c in out.outputs)
    engine = llm.engine
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_max_and_min_tokens(llm, prompts):
    (out,) = llm.generate([prompts[2]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                          use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"
    greedy = _tokens(llm.generate([prompts[2]], GREEDY, use_tqdm=False))[0]
    first = greedy[0]
    stop_now = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, stop_token_ids=[first])
    (out,) = llm.generate([prompts[2]], stop_now, use_tqdm=False)
    assert out.outputs[0].token_ids == [first]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", first)
    held = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, stop_token_ids=[first], min_tokens=4)
    (out,) = llm.generate([prompts[2]], held, use_tqdm=False)
    assert len(out.outputs[0].token_ids) >= 4
    assert first not in out.outputs[0].token_ids[:4]


def test_stop_string_spanning_tokens(llm, prompts):
    (full,) = llm.generate([prompts[3]], GREEDY, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    ids = full.outputs[0].token_ids
    text = full.outputs[0].text
    # a stop string made of the end of token 3 and the start of token 4's text
    cut = len(tokenizer.decode(ids[:4]))
    stop = text[cut - 2 : cut + 2]
    assert len(stop) == 4
    expected = text[: text.find(stop)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, stop=[stop])
    (out,) = llm.generate([prompts[3]], params, use_tqdm=False)
    completion = out.outputs[0]
    assert completion.text == expected
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    kept = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, stop=[stop],
                          include_stop_str_in_output=True)
    (out,) = llm.generate([prompts[3]], kept, use_tqdm=False)
    assert out.outputs[0].text == expected + stop


@torch.no_grad()
@pytest.mark.parametrize("chunk", [None, 16])
def test_logprobs_match_reference_log_softmax(llm, tiny, prompts, chunk):
    if chunk is not None:  # prompt logprobs gathered over several prefill chunks
        llm = LLM(str(tiny[0]), **BASE, max_num_batched_tokens=chunk)
    prompt = prompts[1]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    completion = out.outputs[0]
    full = prompt + completion.token_ids
    ref = torch.log_softmax(tiny[1](torch.tensor([full])).logits[0].float(), dim=-1)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + step]
        assert entry[token].rank == 1
        assert abs(entry[token].logprob - float(row[token])) < 1e-4
        top = row.topk(3)
        assert set(entry) == set(top.indices.tolist())
        for tid, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert abs(entry[tid].logprob - value) < 1e-4
    assert abs(completion.cumulative_logprob - sum(e[t].logprob for t, e in
                                                   zip(completion.token_ids, completion.logprobs, strict=True))) < 1e-4
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry, token = out.prompt_logprobs[pos], prompt[pos]
        row = ref[pos - 1]
        assert abs(entry[token].logprob - float(row[token])) < 1e-4
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        assert len(entry) in (2, 3)


def test_abort_midway_leaves_cache_as_before(llm, prompts):
    engine = llm.engine
    before = engine.cache.num_free_blocks
    engine.add_request("to-abort", prompts[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("keeps-going", prompts[5], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.cache.num_free_blocks < before
    final = engine.abort_request("to-abort")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    engine.abort_request("keeps-going")
    engine.step()
    assert engine.cache.num_free_blocks == before
    assert not engine.has_unfinished_requests()


def test_invalid_requests_raise(llm):
    with pytest.raises(InvalidRequestError, match=r"prompt has 300 tokens, max_model_len is 256"):
        llm.generate([[5] * 300], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        llm.generate([[5, 6]], SamplingParams(stop_token_ids=[VOCAB + 1]), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_kv_cache_too_small_for_max_model_len(tiny):
    with pytest.raises(EngineConfigError, match=r"max_model_len=256 needs 16 KV blocks .*lower max_model_len"):
        LLMEngine(EngineConfig(str(tiny[0]), **{**BASE, "kv_cache_memory": 4096}))


def test_n_edge_cases(llm, prompts):
    one = SamplingParams(n=3, temperature=1.0, max_tokens=1, seed=3)
    (out,) = llm.generate([prompts[5]], one, use_tqdm=False)
    assert [len(c.token_ids) for c in out.outputs] == [1, 1, 1]
    greedy_first = _tokens(llm.generate([prompts[5]], GREEDY, use_tqdm=False))[0][0]
    stop_first = SamplingParams(n=2, temperature=0.0, max_tokens=5, stop_token_ids=[greedy_first])
    (out,) = llm.generate([prompts[5]], stop_first, use_tqdm=False)
    assert [c.token_ids for c in out.outputs] == [[greedy_first]] * 2
    assert llm.engine.cache.num_free_blocks == llm.engine.cache.num_blocks


def test_priority_policy_serves_lower_values_first(tiny, prompts):
    """One sequence at a time: requests run in priority order (lower first, then arrival)."""
    llm = LLM(str(tiny[0]), **BASE, max_num_seqs=1, scheduling_policy="priority")
    outs = llm.generate(prompts[:4], GREEDY, priority=[2, 0, 1, 0], use_tqdm=False)
    started = [out.metrics.first_scheduled_time for out in outs]
    assert sorted(range(4), key=lambda i: started[i]) == [1, 3, 2, 0]
    fcfs = LLM(str(tiny[0]), **BASE, max_num_seqs=1)
    with pytest.raises(InvalidRequestError, match="priority scheduling is not enabled"):
        fcfs.generate(prompts[:2], GREEDY, priority=[1, 0], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="2 priorities for 1 prompts"):
        llm.generate(prompts[:1], GREEDY, priority=[1, 0], use_tqdm=False)
