"""Property-based tests: random workloads through the scheduler and the real KVCacheManager
with a fake model (random tokens, stops, accepted drafts, aborts and forks), checking the
scheduler's invariants after every step."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from kvpage_sched import (
    FinishReason,
    Request,
    RequestRejectedError,
    RequestStatus,
    Scheduler,
    SchedulerOutput,
)
from sched_helpers import BLOCK_SIZE, make_sched

MAX_MODEL_LEN = 64


@dataclass
class Spec:
    prompt: list[int]
    max_tokens: int
    priority: int
    lora: str | None
    arrival_step: int


specs = st.lists(st.builds(
    Spec,
    prompt=st.lists(st.integers(0, 3), min_size=1, max_size=40),  # tiny vocabulary: prefix hits
    max_tokens=st.integers(1, 32),
    priority=st.integers(0, 2),
    lora=st.sampled_from([None, None, "a", "b"]),
    arrival_step=st.integers(0, 12),
), min_size=1, max_size=12)

configs = st.fixed_dictionaries({
    "num_blocks": st.integers(6, 32),
    "prefix_caching": st.booleans(),
    "max_num_seqs": st.integers(1, 6),
    "max_num_batched_tokens": st.integers(3, 40),
    "enable_chunked_prefill": st.booleans(),
    "max_prefill_chunk": st.sampled_from([None, None, 1, 5, 16]),
    "policy": st.sampled_from(["fcfs", "priority"]),
    "num_lookahead_tokens": st.sampled_from([0, 0, 1, 2]),
    "max_loras": st.sampled_from([None, 1, 2]),
})


def _victim_key(sched: Scheduler, r: Request) -> tuple:
    base = (r.arrival_time, r.seq)
    return (r.priority, *base) if sched.config.policy == "priority" else base


def check_schedule(sched: Scheduler, cache, out: SchedulerOutput) -> None:
    cfg = sched.config
    total = sum(s.num_tokens + s.num_lookahead_tokens for s in out.scheduled)
    assert total == out.stats.num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs
    loras = {s.request.lora_id for s in out.scheduled} - {None}
    assert cfg.max_loras is None or len(loras) <= cfg.max_loras
    assert len({s.request_id for s in out.scheduled}) == len(out.scheduled)
    for s in out.scheduled:
        r = s.request
        assert r.status is RequestStatus.RUNNING and s.request_id not in out.preempted_ids
        assert s.start == r.num_computed_tokens and s.num_tokens >= 1
        assert s.start + s.num_tokens <= r.num_tokens
        assert s.is_prefill_chunk == (s.start + s.num_tokens < r.num_tokens)
        assert s.block_ids == cache.block_ids(s.request_id)
        assert len(s.block_ids) * BLOCK_SIZE >= s.start + s.num_tokens + s.num_lookahead_tokens
        assert set(s.new_block_ids) <= set(s.block_ids)
        assert s.start + s.num_tokens + s.num_lookahead_tokens <= max(MAX_MODEL_LEN,
                                                                      r.num_prompt_tokens)
    for rid in out.preempted_ids:  # victims: lowest priority, then latest arrival
        victim = next(r for r in sched.waiting if r.request_id == rid)
        assert victim.num_computed_tokens == 0 and victim.status is RequestStatus.PREEMPTED
        assert all(_victim_key(sched, r) < _victim_key(sched, victim) for r in sched.running)


def check_state(sched: Scheduler, cache) -> None:
    for r in sched.running:
        assert r.status is RequestStatus.RUNNING
        assert cache.num_tokens(r.request_id) == r.num_computed_tokens < r.num_tokens
        assert len(cache.block_ids(r.request_id)) * BLOCK_SIZE >= r.num_computed_tokens
        assert r.num_output_tokens <= r.max_tokens
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.num_computed_tokens == 0 and r.request_id not in cache
    assert len({r.request_id for r in sched.running}) == sched.num_running


def fake_model(out: SchedulerOutput, rng: random.Random) -> tuple[dict, dict]:
    tokens, stops = {}, {}
    for s in out.scheduled:
        if not s.is_prefill_chunk:
            tokens[s.request_id] = [rng.randrange(4)
                                    for _ in range(1 + rng.randint(0, s.num_lookahead_tokens))]
            if rng.random() < 0.03:
                stops[s.request_id] = FinishReason.STOP
    return tokens, stops


def disturb(sched: Scheduler, rng: random.Random, live: dict[str, Request], step: int) -> None:
    """Abort any request now and then; fork a running one now and then."""
    if live and rng.random() < 0.05:
        sched.abort_request(rng.choice(sorted(live)))
    running = [r for r in sched.running if r.num_output_tokens and r.num_computed_tokens
               >= r.num_prompt_tokens]
    if running and rng.random() < 0.05:
        parent = rng.choice(running)
        common = parent.output_token_ids[:parent.num_computed_tokens - parent.num_prompt_tokens]
        child = sched.fork_request(parent.request_id, f"{parent.request_id}.{step}",
                                   [*common, rng.randrange(4)])
        live[child.request_id] = child


def admissible(sched: Scheduler, cache, spec: Spec) -> bool:
    cfg, n = sched.config, len(spec.prompt)
    peak = min(n + spec.max_tokens, cfg.max_model_len) + cfg.num_lookahead_tokens
    return (n <= cfg.max_model_len and cache.can_ever_fit(peak)
            and (cfg.enable_chunked_prefill or n <= cfg.max_num_batched_tokens))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, workload=specs, seed=st.integers(0, 2**16))
def test_random_workloads_hold_the_invariants(cfg, workload, seed):
    sched, cache = make_sched(max_model_len=MAX_MODEL_LEN, **cfg)
    rng = random.Random(seed)
    live: dict[str, Request] = {}
    for step in range(3000):
        for i, spec in enumerate(workload):
            if spec.arrival_step == step:
                r = Request(f"r{i}", spec.prompt, spec.max_tokens, spec.priority,
                            float(step), lora_id=spec.lora)
                try:
                    sched.add_request(r)
                    live[r.request_id] = r
                except RequestRejectedError:
                    assert not admissible(sched, cache, spec)
                    continue
                assert admissible(sched, cache, spec)
        if step > 12 and not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        check_schedule(sched, cache, out)
        for rid in out.finished_ids:
            assert live.pop(rid).is_finished
        sched.update_from_output(out, *fake_model(out, rng))
        check_state(sched, cache)
        disturb(sched, rng, live, step)
    else:
        raise AssertionError("workload did not finish")
    assert all(r.is_finished for r in live.values())
    event(f"preemptions: {min(sched.num_preemptions, 3)}+")
    event(f"steps: {step // 50 * 50}+")
    assert cache.usage() == 0.0 and cache.num_free_blocks == cache.num_blocks


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 30)), min_size=2,
                         max_size=25),
       num_blocks=st.integers(10, 28), budget=st.integers(4, 48),
       prefix_caching=st.booleans(), seed=st.integers(0, 2**16))
def test_fcfs_never_starves(workload, num_blocks, budget, prefix_caching, seed):
    """Requests keep arriving (one per step) and finishing; each request is admitted in
    arrival order and finishes within a bound set by the work of the requests that arrived
    before it, whatever arrives later."""
    sched, cache = make_sched(num_blocks, prefix_caching, max_model_len=MAX_MODEL_LEN,
                              max_num_seqs=4, max_num_batched_tokens=budget)
    rng = random.Random(seed)
    reqs = [Request(f"r{i}", [rng.randrange(4) for _ in range(p)], m, arrival_time=float(i))
            for i, (p, m) in enumerate(workload) if cache.can_ever_fit(p + m)]
    admitted, finished_at = [], {}
    step = 0
    while step < len(reqs) or sched.has_unfinished_requests():
        if step < len(reqs):
            sched.add_request(reqs[step])
        out = sched.schedule()
        admitted += [s.request_id for s in out.scheduled
                     if s.request.num_preemptions == 0 and s.request_id not in admitted]
        tokens, stops = fake_model(out, rng)
        sched.update_from_output(out, tokens, stops)
        for s in out.scheduled:
            if s.request.is_finished:
                finished_at[s.request_id] = step
        step += 1
        assert step < 20_000
    assert admitted == [r.request_id for r in reqs]
    event(f"preemptions: {min(sched.num_preemptions, 3)}+")
    work = 0
    for i, r in enumerate(reqs):
        work += -(-r.num_prompt_tokens // budget) + r.max_tokens
        assert finished_at[r.request_id] - i <= 4 * work + 10, r.request_id
    assert cache.num_free_blocks == cache.num_blocks
