"""Unit tests of the scheduler's decisions, over the real KVCacheManager (block size 4)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kvpage_sched import (
    CacheManagerProtocol,
    FinishReason,
    Request,
    RequestNotFoundError,
    RequestRejectedError,
    RequestStatus,
    SchedulerConfig,
    SchedulerConfigError,
)
from sched_helpers import BLOCK_SIZE, ids, make_sched, req, run_until_done, step


def test_fcfs_admits_in_arrival_order():
    sched, _ = make_sched(max_num_seqs=2)
    for i, rid in enumerate("abc"):
        sched.add_request(req(rid, base=100 * i, max_tokens=3))
    assert ids(step(sched)) == ["a", "b"]
    assert sched.get_request("c").status is RequestStatus.WAITING
    step(sched, finished={"a": "stop"})
    assert ids(step(sched)) == ["b", "c"]


def test_priority_lower_value_first_then_arrival():
    sched, _ = make_sched(max_num_seqs=1, policy="priority")
    for i, (rid, prio) in enumerate([("low", 2), ("high", 0), ("mid", 1), ("high2", 0)]):
        sched.add_request(req(rid, base=100 * i, priority=prio, arrival_time=float(i)))
    order = []
    while sched.has_unfinished_requests():
        out = step(sched, finished=None)
        order += [r for r in ids(out) if r not in order]
    assert order == ["high", "high2", "mid", "low"]


def test_long_prompt_is_chunked_to_the_budget():
    sched, _ = make_sched(max_num_batched_tokens=32)
    sched.add_request(req("a", prompt_len=100))
    chunks = []
    for _ in range(4):
        (s,) = step(sched).scheduled
        chunks.append((s.start, s.num_tokens, s.is_prefill_chunk))
    assert chunks == [(0, 32, True), (32, 32, True), (64, 32, True), (96, 4, False)]
    assert sched.get_request("a").output_token_ids == [7]


def test_prefill_chunk_cap_per_request():
    sched, _ = make_sched(max_num_batched_tokens=64, max_prefill_chunk=10)
    sched.add_request(req("a", prompt_len=25))
    sched.add_request(req("b", prompt_len=25, base=500))
    out = step(sched)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 10), ("b", 10)]


def test_chunk_shares_budget_with_decodes():
    sched, _ = make_sched(max_num_batched_tokens=16)
    sched.add_request(req("a", prompt_len=8, max_tokens=10))
    step(sched)
    sched.add_request(req("b", prompt_len=40, base=500))
    out = step(sched)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 15)]
    assert out.stats.num_scheduled_tokens == 16


def test_without_chunked_prefill_a_prompt_waits_for_room():
    sched, _ = make_sched(max_num_batched_tokens=64, enable_chunked_prefill=False)
    sched.add_request(req("a", prompt_len=40, max_tokens=10))
    sched.add_request(req("b", prompt_len=40, base=500))
    out = step(sched)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 40)]
    out = step(sched)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 40)]


def test_budget_and_sequence_cap_hold():
    sched, _ = make_sched(num_blocks=512, max_num_seqs=5, max_num_batched_tokens=50)
    for i in range(20):
        sched.add_request(req(f"r{i}", prompt_len=3 + 7 * i % 30, base=100 * i, max_tokens=6))
    while sched.has_unfinished_requests():
        out = step(sched)
        assert len(out.scheduled) <= 5 and sched.num_running <= 5
        assert sum(s.num_tokens for s in out.scheduled) == out.stats.num_scheduled_tokens <= 50


def test_prefix_hit_counts_as_computed():
    sched, cache = make_sched()
    sched.add_request(req("a", prompt_len=22, max_tokens=1))
    run_until_done(sched)
    sched.add_request(req("b", prompt_len=22, max_tokens=1))
    out = sched.schedule()
    (s,) = out.scheduled
    assert (s.start, s.num_tokens) == (20, 2)  # 5 full blocks reused, the rest computed
    assert out.stats.num_prefix_hit_tokens == 20
    assert sched.get_request("b").num_cached_tokens == 20
    assert s.block_ids[:5] == cache.block_ids("b")[:5] and len(s.new_block_ids) == 1


def test_full_prompt_hit_still_computes_the_last_token():
    sched, _ = make_sched()
    sched.add_request(req("a", prompt_len=16, max_tokens=1))
    run_until_done(sched)
    sched.add_request(req("b", prompt_len=16, max_tokens=1))
    (s,) = sched.schedule().scheduled
    assert s.start + s.num_tokens == 16 and s.num_tokens >= 1 and not s.is_prefill_chunk


def test_lora_requests_do_not_share_prefix_with_base_model():
    sched, _ = make_sched()
    sched.add_request(req("a", prompt_len=22, max_tokens=1))
    run_until_done(sched)
    sched.add_request(req("b", prompt_len=22, max_tokens=1, lora_id="ad1"))
    (s,) = sched.schedule().scheduled
    assert s.start == 0


def _preemption_setup():
    """8 blocks of 4 tokens: a (older) and b (younger) decode until the cache runs out."""
    sched, cache = make_sched(num_blocks=8, prefix_caching=False)
    sched.add_request(req("a", prompt_len=8, max_tokens=20, arrival_time=0.0))
    sched.add_request(req("b", prompt_len=8, max_tokens=20, base=100, arrival_time=1.0))
    return sched, cache


def test_preemption_by_recompute_takes_the_latest_arrival():
    sched, cache = _preemption_setup()
    out = step(sched)
    while not out.preempted_ids:
        out = step(sched)
    assert out.preempted_ids == ["b"] and ids(out) == ["a"]
    b = sched.get_request("b")
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and len(b.output_token_ids) > 0
    assert list(sched.waiting)[0] is b and sched.running == [sched.get_request("a")]


def test_preempted_request_resumes_by_recomputing_exactly_its_tokens():
    sched, cache = _preemption_setup()
    out = step(sched)
    while not out.preempted_ids:
        out = step(sched)
    b = sched.get_request("b")
    known = list(b.all_token_ids)
    while True:
        out = step(sched, token=9)
        if "b" in ids(out):
            break
    (s,) = [s for s in out.scheduled if s.request_id == "b"]
    assert (s.start, s.start + s.num_tokens) == (0, len(known))  # prefix caching off
    assert not s.is_prefill_chunk and b.all_token_ids[:len(known)] == known
    assert b.all_token_ids[len(known)] == 9 and b.status is RequestStatus.RUNNING
    run_until_done(sched)
    assert cache.num_free_blocks == 8


def test_resume_uses_prefix_cache_hits():
    sched, cache = make_sched(num_blocks=8)
    sched.add_request(req("a", prompt_len=8, max_tokens=20, arrival_time=0.0))
    sched.add_request(req("b", prompt_len=8, max_tokens=20, base=100, arrival_time=1.0))
    out = step(sched)
    while not out.preempted_ids:
        out = step(sched)
    sched.abort_request("a")
    (s,) = sched.schedule().scheduled
    assert s.request_id == "b" and s.start > 0 and s.start % BLOCK_SIZE == 0


def test_request_preempts_itself_when_it_is_the_lowest():
    sched, _ = make_sched(num_blocks=8, prefix_caching=False, policy="priority")
    sched.add_request(req("a", prompt_len=8, max_tokens=20, priority=0, arrival_time=1.0))
    sched.add_request(req("b", prompt_len=8, max_tokens=20, base=100, priority=5,
                          arrival_time=0.0))
    out = step(sched)
    while not out.preempted_ids:
        out = step(sched)
    # b (priority 5) goes even though it arrived first; when b is the one short of a block,
    # it preempts itself.
    assert out.preempted_ids == ["b"] and ids(out) == ["a"]


def test_abort_of_a_preempted_request():
    sched, cache = _preemption_setup()
    out = step(sched)
    while not out.preempted_ids:
        out = step(sched)
    sched.abort_request("b")
    assert sched.schedule().finished_ids == ["b"] and sched.num_waiting == 0
    assert cache.num_free_blocks == 8 - len(cache.block_ids("a"))
    sched.abort_request("a")
    assert sched.schedule().finished_ids == ["a"] and cache.num_free_blocks == 8


@pytest.mark.parametrize("when", ["waiting", "running", "mid_chunk", "between_schedule_and_update"])
def test_abort_reports_the_id_once(when):
    sched, cache = make_sched(max_num_batched_tokens=8)
    sched.add_request(req("a", prompt_len=4 if when != "mid_chunk" else 30, max_tokens=9))
    if when in ("running", "mid_chunk"):
        step(sched)
    a = sched.get_request("a")
    if when == "between_schedule_and_update":
        out = sched.schedule()
        sched.abort_request("a")
        sched.update_from_output(out, {"a": [1]})
    else:
        sched.abort_request("a")
    assert a.status is RequestStatus.FINISHED_ABORTED and a.finish_reason is FinishReason.ABORT
    assert sched.schedule().finished_ids == ["a"]
    assert sched.schedule().finished_ids == []
    assert cache.num_free_blocks == cache.num_blocks
    with pytest.raises(RequestNotFoundError):
        sched.get_request("a")


def test_lookahead_slots_and_rollback():
    sched, cache = make_sched(num_lookahead_tokens=3)
    sched.add_request(req("a", prompt_len=6, max_tokens=20))
    (s,) = step(sched).scheduled
    assert s.num_lookahead_tokens == 0  # prefill: no drafts
    out = sched.schedule()
    (s,) = out.scheduled
    assert (s.start, s.num_tokens, s.num_lookahead_tokens) == (6, 1, 3)
    assert len(s.block_ids) == 3  # slots for 6 + 1 + 3 tokens
    assert out.stats.num_scheduled_tokens == 4
    sched.update_from_output(out, {"a": [11, 12]})  # one draft accepted + the bonus token
    a = sched.get_request("a")
    assert a.output_token_ids == [7, 11, 12] and a.num_computed_tokens == 8
    assert cache.num_tokens("a") == 8 and len(cache.block_ids("a")) == 2  # rolled back


def test_lookahead_all_accepted_and_capped_by_max_tokens():
    sched, cache = make_sched(num_lookahead_tokens=3)
    sched.add_request(req("a", prompt_len=6, max_tokens=6))
    step(sched)
    step(sched, token=lambda rid: [1, 2, 3, 4])  # all 3 drafts accepted + bonus
    a = sched.get_request("a")
    assert a.num_output_tokens == 5 and a.num_computed_tokens == a.num_tokens - 1
    assert cache.num_tokens("a") == a.num_computed_tokens
    (s,) = sched.schedule().scheduled
    assert s.num_lookahead_tokens == 0  # one token left to produce


def test_max_loras_caps_distinct_adapters_per_step():
    sched, _ = make_sched(max_loras=1)
    sched.add_request(req("x1", lora_id="x", max_tokens=3))
    sched.add_request(req("y1", lora_id="y", base=100, max_tokens=3))
    sched.add_request(req("x2", lora_id="x", base=200, max_tokens=3))
    sched.add_request(req("base", base=300, max_tokens=3))
    assert ids(step(sched)) == ["x1", "x2", "base"]
    run_until_done(sched)
    assert sched.get_request("y1").num_output_tokens == 3


def test_running_adapters_over_the_cap_take_turns():
    sched, _ = make_sched(max_loras=1)
    sched.add_request(req("x", lora_id="x", max_tokens=8))
    step(sched)
    sched.fork_request("x", "x2", [5])
    sched.add_request(req("y", lora_id="y", base=100, max_tokens=8))
    seen = set()
    for _ in range(8):
        out = step(sched)
        assert len({s.request.lora_id for s in out.scheduled}) <= 1
        seen |= set(ids(out))
    assert seen == {"x", "x2", "y"}


def test_rejected_at_add_request():
    sched, _ = make_sched(num_blocks=16, max_model_len=64, max_num_batched_tokens=32,
                          enable_chunked_prefill=False)
    with pytest.raises(RequestRejectedError, match="prompt of 65 tokens exceeds max_model_len 64"):
        sched.add_request(req("a", prompt_len=65))
    with pytest.raises(RequestRejectedError, match="max_num_batched_tokens 32"):
        sched.add_request(req("b", prompt_len=40))
    with pytest.raises(RequestRejectedError, match="whole KV cache"):
        make_sched(num_blocks=4)[0].add_request(req("c", prompt_len=10, max_tokens=10))
    with pytest.raises(RequestRejectedError, match="empty"):
        sched.add_request(req("d", prompt_len=0))
    sched.add_request(req("e"))
    with pytest.raises(RequestRejectedError, match="already exists"):
        sched.add_request(req("e"))
    assert sched.num_waiting == 1


def test_generation_stops_at_max_model_len():
    sched, _ = make_sched(max_model_len=12)
    a, b = req("a", prompt_len=10, max_tokens=100), req("b", prompt_len=12, max_tokens=100, base=100)
    sched.add_request(a)
    sched.add_request(b)
    run_until_done(sched)
    assert a.num_tokens == 12 and a.finish_reason is FinishReason.LENGTH
    assert b.num_output_tokens == 1 and b.finish_reason is FinishReason.LENGTH


def test_stop_reported_by_the_runtime_and_max_tokens():
    sched, cache = make_sched()
    sched.add_request(req("a", max_tokens=3))
    sched.add_request(req("b", base=100, max_tokens=3))
    step(sched, finished={"a": FinishReason.STOP})
    a = sched.get_request("a")
    assert a.status is RequestStatus.FINISHED_STOPPED and a.output_token_ids == [7]
    run_until_done(sched)
    b = sched.get_request("b")
    assert b.output_token_ids == [7, 7, 7] and b.status is RequestStatus.FINISHED_LENGTH
    assert cache.usage() == 0.0


def test_fork_shares_blocks_and_copies_on_write():
    sched, cache = make_sched(prefix_caching=False)
    sched.add_request(req("p", prompt_len=10, max_tokens=4))
    step(sched, token=1)
    child = sched.fork_request("p", "c", [2])
    assert child.status is RequestStatus.RUNNING and child.num_computed_tokens == 10
    assert cache.block_ids("c") == cache.block_ids("p")
    out = step(sched)
    assert ids(out) == ["p", "c"]
    assert len(out.block_copies) == 1  # the shared partial last block
    src, dst = out.block_copies[0]
    tables = [cache.block_ids("p"), cache.block_ids("c")]
    assert tables[0][:2] == tables[1][:2] and {tables[0][2], tables[1][2]} == {src, dst}
    run_until_done(sched)
    assert child.output_token_ids == [2, 7, 7, 7] and cache.num_free_blocks == cache.num_blocks


def test_fork_of_a_waiting_parent_waits_too():
    sched, _ = make_sched()
    sched.add_request(req("p"))
    child = sched.fork_request("p", "c", [])
    assert child.status is RequestStatus.WAITING
    run_until_done(sched)
    assert child.num_output_tokens == 4 and child.is_finished


def test_fork_of_a_parent_that_just_finished():
    sched, cache = make_sched()
    sched.add_request(req("p", max_tokens=1))
    step(sched, token=1)
    assert sched.get_request("p").finish_reason is FinishReason.LENGTH
    done = sched.fork_request("p", "c1", [2])  # already has max_tokens tokens
    assert done.finish_reason is FinishReason.LENGTH
    sched.add_request(req("q", max_tokens=3))
    step(sched, token=1, finished={"q": "stop"})
    child = sched.fork_request("q", "c2", [3])  # q holds no KV any more: c2 recomputes
    assert child.status is RequestStatus.WAITING
    run_until_done(sched)
    assert child.output_token_ids == [3, 7, 7] and cache.usage() == 0.0


def test_fork_rejects_tokens_that_contradict_the_parent():
    sched, _ = make_sched()
    sched.add_request(req("p", max_tokens=8))
    step(sched, token=1)
    step(sched, token=2)  # parent computed prompt + [1]
    with pytest.raises(RequestRejectedError):
        sched.fork_request("p", "c", [3, 4])
    with pytest.raises(RequestNotFoundError):
        sched.fork_request("nope", "c", [3])


def test_output_and_stats():
    sched, _ = make_sched(num_blocks=32)
    sched.add_request(req("a", prompt_len=8))
    sched.add_request(req("b", prompt_len=8, base=50))
    out = sched.schedule()
    assert [(s.start, s.num_tokens, len(s.new_block_ids)) for s in out.scheduled] == [
        (0, 8, 2), (0, 8, 2)]
    assert out.stats.num_running == 2 and out.stats.num_waiting == 0
    assert out.stats.kv_usage == pytest.approx(4 / 32) and out.num_scheduled_tokens == 16
    assert out.scheduled[0].request.all_token_ids[0:8] == list(range(8))


def test_config_validation():
    with pytest.raises(SchedulerConfigError):
        SchedulerConfig(policy="lifo")
    with pytest.raises(SchedulerConfigError):
        SchedulerConfig(max_num_batched_tokens=4, num_lookahead_tokens=4)
    assert Request("x", [1], 1).arrival_time is not None


def test_a_request_given_no_token_waits_without_being_scheduled():
    """A running request whose step sampled nothing (its next token is decided outside the
    scheduler, as in beam search) has nothing to compute until it gets one."""
    sched, _ = make_sched()
    sched.add_request(req("a", prompt_len=8))
    sched.update_from_output(sched.schedule(), {}, {})  # the prompt, then no token
    assert sched.schedule().scheduled == []
    child = sched.fork_request("a", "b", [7])
    assert [s.request_id for s in sched.schedule().scheduled] == [child.request_id]


def test_blocks_out_of_the_sliding_window_go_back_as_a_request_moves_on():
    """A 64-token window over 4-token blocks: however long the request grows (chunked prompt,
    then decode), it never holds more than the window's blocks plus the two at its edges."""
    window = 16 * BLOCK_SIZE
    sched, cache = make_sched(num_blocks=40, sliding_window=window, max_num_batched_tokens=32,
                              max_model_len=1024)
    sched.add_request(req("long", prompt_len=300, max_tokens=300))
    held = []
    while sched.has_unfinished_requests():
        step(sched)
        if "long" in cache:
            held.append(cache.num_blocks - cache.num_free_blocks)
    assert max(held) <= window // BLOCK_SIZE + 2 + 32 // BLOCK_SIZE  # + one chunk in flight
    assert cache.num_free_blocks == cache.num_blocks
    without, _ = make_sched(num_blocks=40, max_model_len=1024)
    with pytest.raises(RequestRejectedError):  # the same request cannot fit without the window
        without.add_request(req("long", prompt_len=300, max_tokens=300))


def test_kv_cache_manager_has_what_the_protocol_names():
    _, cache = make_sched()
    members = [m for m in vars(CacheManagerProtocol) if not m.startswith("_")]
    assert "allocate_slots" in members and all(hasattr(cache, m) for m in members)


def test_import_pulls_in_nothing_heavy():
    code = "import sys, kvpage_sched; sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_prompt_waiting_for_memory_counts_once_in_the_prefix_hit_rate():
    sched, cache = make_sched(num_blocks=8)
    sched.add_request(req("a", prompt_len=12, max_tokens=1))
    run_until_done(sched)  # its 3 full blocks stay cached
    sched.add_request(req("big", prompt_len=21, base=500, max_tokens=3))  # takes 6 blocks
    sched.add_request(Request("b", list(range(12)) + [99], 1))  # hits a's first blocks
    stuck = 0
    while sched.get_request("b").status is RequestStatus.WAITING:
        step(sched)
        stuck += 1
    assert stuck >= 3  # looked up at every one of these steps
    stats = cache.stats
    assert (stats.queries, stats.query_tokens) == (3, 12 + 21 + 13)
    assert (stats.hits, stats.hit_tokens) == (1, 8) and stats.hit_rate == 8 / 46


@pytest.mark.parametrize("sampled", [[7], [7, 8]])  # [7, 8]: one accepted draft and the bonus
def test_decoded_tokens_fill_blocks_that_a_later_prompt_hits(sampled):
    sched, cache = make_sched(num_lookahead_tokens=len(sampled) - 1)
    sched.add_request(req("a", prompt_len=6, max_tokens=9))
    a = sched.get_request("a")
    while sched.has_unfinished_requests():
        step(sched, token=lambda rid: list(sampled))
    assert a.num_tokens == 15 and a.num_computed_tokens >= 12
    sched.add_request(Request("b", list(a.all_token_ids), 1))
    out = sched.schedule()
    (s,) = out.scheduled
    assert out.stats.num_prefix_hit_tokens == 12 and (s.start, s.num_tokens) == (12, 3)
