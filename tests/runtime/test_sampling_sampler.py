"""The batched sampler against straightforward per-row references."""

import torch
from kvpage_runtime.sampling import Sampler, SamplingParams, SamplingRow, top_logprobs


def _row(prompt=(1, 2), output=(), generator=None, blocked=(), **kw):
    return SamplingRow(SamplingParams(**kw), list(prompt), list(output), generator, blocked)


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    out = Sampler()(logits, [_row(temperature=0.0) for _ in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_logit_bias_and_min_tokens_mask():
    logits = torch.zeros(2, 10)
    logits[:, 3] = 5.0
    rows = [_row(temperature=0.0, logit_bias={7: 10.0}), _row(temperature=0.0, blocked=[3])]
    out = Sampler()(logits, rows)
    assert out.token_ids[0] == 7
    assert out.token_ids[1] != 3


def test_penalties_follow_vllm_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    row = _row(prompt=[0], output=[1, 2, 2], temperature=0.0, repetition_penalty=2.0,
               frequency_penalty=0.1, presence_penalty=0.2)
    from kvpage_runtime.sampling.sampler import _apply_logits_processors

    got = _apply_logits_processors(logits, [row])[0]
    expected = torch.tensor([2.0 / 2, -2.0 * 2 - 0.1 - 0.2, 1.0 / 2 - 0.2 - 0.2, 0.5])
    torch.testing.assert_close(got, expected)


def test_top_k_top_p_min_p_restrict_support():
    torch.manual_seed(0)
    logits = torch.randn(1, 40)
    order = logits[0].argsort(descending=True).tolist()
    sampler = Sampler(seed=1)
    seen_k, seen_p, seen_minp = set(), set(), set()
    probs = logits[0].softmax(-1)
    for _ in range(200):
        seen_k.update(sampler(logits, [_row(top_k=3)]).token_ids)
        seen_p.update(sampler(logits, [_row(top_p=0.3)]).token_ids)
        seen_minp.update(sampler(logits, [_row(min_p=0.5)]).token_ids)
    assert seen_k <= set(order[:3]) and len(seen_k) > 1
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.3).sum()) + 1])
    assert seen_p <= nucleus
    assert all(probs[t] >= 0.5 * probs.max() for t in seen_minp)


def test_mixed_top_k_batch_uses_each_rows_k():
    logits = torch.randn(3, 30)
    rows = [_row(top_k=1), _row(top_k=2, top_p=0.99), _row(temperature=0.0)]
    for _ in range(20):
        out = Sampler()(logits, rows).token_ids
        assert out[0] == int(logits[0].argmax())
        assert out[1] in logits[1].topk(2).indices.tolist()
        assert out[2] == int(logits[2].argmax())


def test_seeded_row_independent_of_batch_companions():
    torch.manual_seed(0)
    logits = torch.randn(1, 100)
    alone = [Sampler(seed=0)(logits, [_row(generator=torch.Generator().manual_seed(7))]).token_ids[0]
             for _ in range(1)]
    seq_alone = []
    gen = torch.Generator().manual_seed(7)
    s = Sampler(seed=0)
    for _ in range(10):
        seq_alone.append(s(logits, [_row(generator=gen)]).token_ids[0])
    seq_batched = []
    gen = torch.Generator().manual_seed(7)
    s = Sampler(seed=123)
    big = torch.cat([torch.randn(5, 100), logits, torch.randn(3, 100)])
    for _ in range(10):
        rows = [_row() for _ in range(5)] + [_row(generator=gen)] + [_row(temperature=0.0)] * 3
        seq_batched.append(s(big, rows).token_ids[5])
    assert seq_alone == seq_batched
    assert alone[0] == seq_alone[0]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    s = Sampler(seed=3)
    counts = torch.zeros(3)
    rows = [_row() for _ in range(2000)]
    for t in s(logits.expand(2000, 3), rows).token_ids:
        counts[t] += 1
    assert torch.allclose(counts / 2000, torch.tensor([0.6, 0.3, 0.1]), atol=0.04)


def test_logprobs_and_ranks():
    logits = torch.randn(2, 20)
    rows = [_row(temperature=0.0, logprobs=3), _row(temperature=0.0)]
    out = Sampler()(logits, rows)
    lp = out.logprobs[0]
    ref = torch.log_softmax(logits[0], -1)
    assert lp.token_id == out.token_ids[0] and lp.rank == 1
    assert abs(lp.logprob - float(ref.max())) < 1e-5
    assert lp.top_ids == ref.topk(3).indices.tolist()
    assert out.logprobs[1] is None
    other = top_logprobs(logits[:1], [0])[0].with_sampled(int(ref.argmin()))
    assert other.rank == 20 and set(other.entries()) == {int(ref.argmin())}


def test_top_k_row_next_to_unrestricted_row():
    logits = torch.randn(2, 30)
    rows = [_row(top_k=2), _row()]
    seen = set()
    sampler = Sampler(seed=5)
    for _ in range(100):
        out = sampler(logits, rows).token_ids
        assert out[0] in logits[0].topk(2).indices.tolist()
        seen.add(out[1])
    assert len(seen) > 2


def test_greedy_on_model_dtype_logits_matches_fp32_and_keeps_the_first_maximum():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=gen).bfloat16()
    logits[2, 7] = logits[2, 400] = 50.0  # a tie: the first index wins
    greedy = [_row(temperature=0.0) for _ in range(6)]
    fast = Sampler()(logits, greedy)
    assert fast.token_ids == logits.float().max(dim=-1).indices.tolist()
    assert fast.token_ids[2] == 7 and fast.logprobs == [None] * 6
    with_logprobs = Sampler()(logits, [_row(temperature=0.0, logprobs=2) for _ in range(6)])
    assert with_logprobs.token_ids == fast.token_ids  # the fp32 path agrees
    assert with_logprobs.logprobs[0] is not None
    biased = Sampler()(logits, [_row(temperature=0.0, logit_bias={3: 100.0}) for _ in range(6)])
    assert biased.token_ids == [3] * 6  # logits processing still applies
