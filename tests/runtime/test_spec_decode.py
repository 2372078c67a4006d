"""Speculative decoding: the n-gram and draft-model proposers, rejection sampling that keeps
the target distribution (chi-square tests at a fixed false-alarm rate), and greedy output
that is the same with and without drafts on every family, under chunked prefill, prefix
caching and preemption."""

from __future__ import annotations

import collections
import random

import pytest
import torch
import transformers
from engine_fixtures import default_tokenizer
from kvpage_runtime import LLM, SamplingParams
from kvpage_runtime.cli import _engine_fields, build_parser
from kvpage_runtime.engine.config import EngineConfig
from kvpage_runtime.engine.outputs import EngineStats
from kvpage_runtime.errors import EngineConfigError
from kvpage_runtime.sampling import SamplingRow
from kvpage_runtime.sampling.sampler import sampling_probs
from kvpage_runtime.server.metrics import ServerMetrics
from kvpage_runtime.spec_decode import ngram
from kvpage_runtime.spec_decode.adaptive import DraftLengthChooser
from kvpage_runtime.spec_decode.config import SpeculativeConfig
from kvpage_runtime.spec_decode.rejection import verify
from model_helpers import TINY, random_prompts, save_tiny_model

FALSE_ALARM = 1e-3  # the chance that a chi-square test below fails although all is right
CONFIGS = {
    "llama": transformers.LlamaConfig(**TINY),
    "qwen2": transformers.Qwen2Config(**TINY),
    "mistral": transformers.MistralConfig(**TINY, sliding_window=8),
    "mixtral": transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
}


def _upper_tail(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X chi-square with ``dof`` degrees of freedom."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def _pooled(pairs: list[tuple[float, float]], small) -> list[tuple[float, float]]:
    """Categories failing ``small`` merged into one."""
    kept = [pair for pair in pairs if not small(pair)]
    rest = [pair for pair in pairs if small(pair)]
    if rest:
        kept.append((sum(a for a, _ in rest), sum(b for _, b in rest)))
    return kept


def chi_square_p_value(observed: list[int], expected: list[float]) -> float:
    """Goodness of fit; categories whose expected count is under 5 are pooled."""
    if any(o and not e for e, o in zip(expected, observed, strict=True)):
        return 0.0  # a token the distribution rules out was drawn
    pairs = [(e, o) for e, o in zip(expected, observed, strict=True) if e]
    kept = _pooled(pairs, lambda pair: pair[0] < 5)
    return _upper_tail(sum((o - e) ** 2 / e for e, o in kept), len(kept) - 1)


def two_sample_p_value(a: list[int], b: list[int]) -> float:
    """Two samples of equal size from one distribution? Categories with under 10 counts in
    both together are pooled."""
    kept = _pooled(list(zip(a, b, strict=True)), lambda pair: pair[0] + pair[1] < 10)
    return _upper_tail(sum((x - y) ** 2 / (x + y) for x, y in kept), len(kept) - 1)


# ---- configuration and proposers --------------------------------------------------------


@pytest.mark.parametrize("raw,named", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "lookahead"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}, "prompt_lookup"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "adaptive": "yes"}, "adaptive"),
])
def test_bad_configurations_are_refused_by_name(raw, named):
    with pytest.raises(EngineConfigError, match=named):
        SpeculativeConfig.from_dict(raw)


def test_the_serve_option_reaches_the_engine_config():
    raw = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}'
    args = build_parser().parse_args(["serve", "--speculative-config", raw])
    config = EngineConfig(**_engine_fields(args, None))
    assert SpeculativeConfig.from_dict(config.speculative_config).prompt_lookup_max == 2
    for bad in ("{method: ngram}", "[1, 2]"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--speculative-config", bad])
    with pytest.raises(EngineConfigError, match="unknown keys"):
        EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                         "num_lookahead_slots": 2})


def test_prometheus_counters_carry_vllm_names():
    stats = EngineStats(0, 0, 0.0, 0.0, 8, 8, 0, spec_decode_num_draft_tokens=12,
                        spec_decode_num_accepted_tokens=7)
    text = ServerMetrics(lambda: stats).exposition().decode()
    assert "kvpage:spec_decode_num_draft_tokens_total 12.0" in text
    assert "kvpage:spec_decode_num_accepted_tokens_total 7.0" in text


def test_ngram_copies_what_followed_the_latest_earlier_occurrence():
    assert ngram.propose([1, 2, 3, 4, 1, 2, 3], 3, 1, 4) == [4, 1, 2]
    assert ngram.propose([7, 1, 2, 9, 1, 2, 5, 1, 2], 2, 2, 2) == [5, 1]  # the latest match
    assert ngram.propose([1, 2, 3, 9], 2, 1, 3) == []  # nothing repeats
    assert ngram.propose([4, 8, 4], 5, 1, 4) == [8, 4]  # fewer than k left


# ---- rejection sampling keeps the target's distribution ----------------------------------


@pytest.mark.parametrize("proposer", ["point mass", "distribution"])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_rejection_sampling_emits_the_target_distribution(proposer, top_p):
    """20,000 verifications of two drafts: the first emitted token follows the target's first
    distribution, and the second (when the first draft was accepted) its second."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, 12, generator=gen) * 1.5
    row = SamplingRow(SamplingParams(temperature=1.0, top_p=top_p), [], [])
    p = sampling_probs(target, [row] * 3)
    q = torch.softmax(torch.randn(2, 12, generator=gen), dim=-1)
    firsts, seconds = collections.Counter(), collections.Counter()
    for _ in range(20_000):
        if proposer == "point mass":
            drafts, probs = [int(torch.multinomial(q[0], 1, generator=gen)), 3], None
        else:
            drafts = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(2)]
            probs = q
        emitted = verify(target, drafts, row, probs, gen)
        firsts[emitted[0]] += 1
        if len(emitted) > 1:
            seconds[emitted[1]] += 1
    n_first, n_second = sum(firsts.values()), sum(seconds.values())
    assert chi_square_p_value([firsts[t] for t in range(12)],
                              [n_first * float(p[0, t]) for t in range(12)]) > FALSE_ALARM
    assert chi_square_p_value([seconds[t] for t in range(12)],
                              [n_second * float(p[1, t]) for t in range(12)]) > FALSE_ALARM


def test_greedy_verification_accepts_the_argmax_only():
    target = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    row = SamplingRow(SamplingParams(temperature=0.0), [], [])
    gen = torch.Generator()
    assert verify(target, [1, 0], row, None, gen) == [1, 0, 2]  # both accepted, then the bonus
    assert verify(target, [1, 2], row, None, gen) == [1, 0]  # the correction replaces draft 2
    assert verify(target, [2, 0], row, None, gen) == [1]


# ---- adaptive draft lengths ------------------------------------------------------------


def simulate(chooser: DraftLengthChooser, accept: float, costs: dict[int, float], steps: int,
             num_decode: int = 1) -> list[int]:
    """``steps`` steps of ``num_decode`` requests: each draft is accepted with chance
    ``accept`` after an accepted one, a step drafting up to k takes ``costs[k]`` (with
    noise). The lengths chosen."""
    rng = random.Random(1)
    chosen = []
    for _ in range(steps):
        k = chooser.choose(num_decode)
        chosen.append(k)
        for _ in range(num_decode if k else 0):
            accepted = 0
            while accepted < k and rng.random() < accept:
                accepted += 1
            chooser.record_drafts(k, accepted)
        chooser.record_step(num_decode, k, costs[k] * rng.uniform(0.9, 1.1))
    return chosen


ONE_STREAM = {0: 10.0, 1: 10.0, 2: 10.2, 4: 13.5, 8: 24.0}  # ms: reading weights dominates
SIXTEEN = {0: 44.0, 1: 73.0, 2: 102.0, 4: 170.0, 8: 262.0}  # grows with the rows


def test_the_chooser_drafts_the_length_with_the_most_tokens_per_second():
    chooser = DraftLengthChooser(8)
    chosen = simulate(chooser, 0.9, ONE_STREAM, 2000)
    assert chosen[:5] == [0, 1, 2, 4, 8]  # each timed first, from the baseline up
    assert chooser.best(1) == 4  # 4.1 tokens in 13.5 ms; 8 gives 6.1 in 24, 2 gives 2.7 in 10.2
    assert collections.Counter(chosen[100:])[4] > 0.95 * 1900


def test_speculation_switches_off_where_it_does_not_pay():
    chooser = DraftLengthChooser(8)
    chosen = simulate(chooser, 0.3, SIXTEEN, 3000, num_decode=16)
    assert chooser.best(16) == 0 and chooser.best(31) == 0
    assert chooser.best(1) is None  # one request per step: not timed yet
    rarely = DraftLengthChooser(8)  # drafts seldom accepted: hardly a step spent timing them
    assert collections.Counter(simulate(rarely, 0.01, SIXTEEN, 300, num_decode=16))[0] >= 298
    assert collections.Counter(simulate(rarely, 0.01, SIXTEEN, 500, num_decode=4))[0] >= 497
    late = chosen[100:]  # re-timing the other lengths costs a few percent of the time
    assert sum(SIXTEEN[k] for k in late) < 1.05 * SIXTEEN[0] * len(late)


def test_the_choice_follows_a_workload_that_changes():
    chooser = DraftLengthChooser(8)
    costs = {0: 10.0, 1: 11.0, 2: 12.0, 4: 14.0, 8: 20.0}
    simulate(chooser, 0.05, costs, 500)
    assert chooser.best(1) == 0
    chosen = simulate(chooser, 0.9, costs, 500)
    late = collections.Counter(chosen[-300:])  # 8 and 4 give 0.31 and 0.29 tokens per ms
    assert chooser.best(1) in (4, 8) and late[4] + late[8] > 285
    switched_off = DraftLengthChooser(8)  # off for long, it still finds when drafts pay again
    simulate(switched_off, 0.02, ONE_STREAM, 300)
    assert collections.Counter(simulate(switched_off, 0.9, ONE_STREAM, 1500)[-500:])[4] > 450


def test_adaptive_speculation_measures_decode_steps_and_keeps_greedy_output(tmp_path):
    """(On a tiny random model drafts are rarely accepted: speculation ends up off.)"""
    folder = _folder("llama", tmp_path)
    base = dict(dtype="float32", device="cpu", max_model_len=256, block_size=4)
    prompts = _repetitive_prompts()
    plain = _greedy(LLM(folder, **base), prompts)
    llm = LLM(folder, **base, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    _assert_same_greedy(_greedy(llm, prompts), plain)
    chooser = llm.engine.speculator.chooser
    assert chooser._timings and all(group[0].steps for group in chooser._timings.values())
    assert chooser._tries[0] > 0  # drafting was tried (and found not to pay)


# ---- the engine: greedy output does not change ---------------------------------------------


def _folder(family: str, tmp_path, layers: int | None = None):
    config = CONFIGS[family]
    if layers is not None:
        config = type(config)(**{**config.to_dict(), "num_hidden_layers": layers})
    save_tiny_model(config, tmp_path)
    default_tokenizer().save_pretrained(tmp_path)
    return str(tmp_path)


def _repetitive_prompts() -> list[list[int]]:
    """Prompts that repeat themselves, so that the n-gram proposer finds matches."""
    base = random_prompts([7, 5, 9, 4], 640, seed=11)
    return [p * 4 for p in base] + random_prompts([13, 30], 640, seed=12)


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)


def _greedy(llm: LLM, prompts) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [(o.outputs[0].token_ids,
             [pos[t].logprob for pos, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids,
                                                strict=True)]) for o in outs]


def _assert_same_greedy(spec, plain):
    """Identical tokens and logprobs within 1e-4, or a divergence at a genuine near-tie (the
    drafted positions are computed as a chunk, the others one at a time)."""
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(spec, plain, strict=True):
        for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)):
            if a != b:
                assert abs(logprobs[i] - ref_logprobs[i]) < 1e-4  # both chose a near-tie
                break
            assert abs(logprobs[i] - ref_logprobs[i]) < 1e-4


@pytest.mark.parametrize("family", list(CONFIGS))
def test_ngram_speculation_leaves_greedy_output_unchanged(family, tmp_path):
    folder = _folder(family, tmp_path)
    base = dict(dtype="float32", device="cpu", max_model_len=256, block_size=4,
                max_num_batched_tokens=32)  # chunked prefill
    prompts = _repetitive_prompts()
    plain = _greedy(LLM(folder, **base), prompts)
    for k in (1, 3, 5):
        llm = LLM(folder, **base, speculative_config={"method": "ngram", "adaptive": False,
                                                      "num_speculative_tokens": k})
        _assert_same_greedy(_greedy(llm, prompts), plain)
        assert llm.engine.num_draft_tokens > 0 and llm.engine.num_accepted_tokens > 0
        assert llm.engine.cache.num_free_blocks == llm.engine.cache.num_blocks


def test_draft_model_speculation_leaves_greedy_output_unchanged(tmp_path):
    target = _folder("llama", tmp_path / "target")
    draft = _folder("llama", tmp_path / "draft", layers=1)  # another model, same vocabulary
    base = dict(dtype="float32", device="cpu", max_model_len=256, block_size=4)
    prompts = _repetitive_prompts()
    plain = _greedy(LLM(target, **base), prompts)
    for k in (1, 3):
        llm = LLM(target, **base, speculative_config={"method": "draft_model", "model": draft,
                                                      "adaptive": False,
                                                      "num_speculative_tokens": k})
        _assert_same_greedy(_greedy(llm, prompts), plain)
        assert llm.engine.num_draft_tokens > 0


def test_speculation_under_preemption_and_prefix_caching(tmp_path):
    folder = _folder("llama", tmp_path)
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    bytes_per_token = 2 * TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * head_dim * 4
    base = dict(dtype="float32", device="cpu", max_model_len=128, block_size=4,
                kv_cache_memory=40 * 4 * bytes_per_token)  # 40 blocks: preempts
    prompts = _repetitive_prompts()
    plain = _greedy(LLM(folder, **base), prompts)
    llm = LLM(folder, **base, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                  "adaptive": False})
    _assert_same_greedy(_greedy(llm, prompts), plain)
    assert llm.engine.num_preemptions > 0
    assert llm.engine.cache.num_free_blocks == llm.engine.cache.num_blocks


def test_a_draft_model_with_another_vocabulary_is_refused(tmp_path):
    target = _folder("llama", tmp_path / "target")
    other = transformers.LlamaConfig(**{**TINY, "vocab_size": 512})
    save_tiny_model(other, tmp_path / "draft")
    with pytest.raises(EngineConfigError, match="vocabulary of 512 tokens, the target's has 640"):
        LLM(target, dtype="float32", device="cpu", max_model_len=64,
            speculative_config={"method": "draft_model", "model": str(tmp_path / "draft"),
                                "num_speculative_tokens": 2})


def test_drafts_and_acceptances_are_counted_per_request(tmp_path):
    llm = LLM(_folder("llama", tmp_path), dtype="float32", device="cpu", max_model_len=256,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                  "adaptive": False})
    out = llm.generate(_repetitive_prompts()[:1], GREEDY, use_tqdm=False)[0]
    assert out.metrics.num_draft_tokens > 0
    assert 0 < out.metrics.num_accepted_tokens <= out.metrics.num_draft_tokens
    assert llm.engine.stats().spec_decode_num_draft_tokens == out.metrics.num_draft_tokens


# ---- the engine: sampled output keeps its distribution -------------------------------------


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampled_tokens_keep_the_target_distribution(tmp_path, top_p):
    """1,500 seeded samples of three tokens with a one-layer draft model (its distribution
    differs from the target's, so drafts are both accepted and rejected) against 1,500
    without drafts: the third token's distribution is the same (two-sample chi-square)."""
    target = _folder("llama", tmp_path / "target")
    draft = _folder("llama", tmp_path / "draft", layers=1)
    prompt = random_prompts([6], 640, seed=5)[0]
    base = dict(dtype="float32", device="cpu", max_model_len=64, max_num_seqs=256)
    counts = []
    for spec in (None, {"method": "draft_model", "model": draft, "num_speculative_tokens": 2,
                        "adaptive": False}):
        llm = LLM(target, **base, speculative_config=spec)
        params = [SamplingParams(temperature=1.0, top_p=top_p, max_tokens=3, ignore_eos=True,
                                 seed=1_000_000 * (spec is not None) + i) for i in range(1500)]
        outs = llm.generate([prompt] * 1500, params, use_tqdm=False)
        counts.append(collections.Counter(o.outputs[0].token_ids[2] for o in outs))
        if spec is not None:
            assert 0 < llm.engine.num_accepted_tokens < llm.engine.num_draft_tokens
    plain, spec = counts
    tokens = sorted(set(plain) | set(spec))
    assert two_sample_p_value([plain[t] for t in tokens], [spec[t] for t in tokens]) > FALSE_ALARM
