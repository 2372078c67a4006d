"""defer_shared_prefixes: a burst of prompts that share a prefix computes its blocks once."""

from __future__ import annotations

from kvpage_sched import Request
from sched_helpers import BLOCK_SIZE, ids, make_sched, run_until_done, step


def shared(rid: str, tail: int, prefix_len: int = 10, **kw) -> Request:
    """A prompt of a common `prefix_len`-token prefix (2 full blocks of 4 and a part) + tail."""
    return Request(rid, [*range(100, 100 + prefix_len), tail, tail + 1], 3, **kw)


def test_a_burst_computes_the_shared_blocks_once():
    sched, cache = make_sched()
    for i in range(4):
        sched.add_request(shared(f"r{i}", 1000 + 10 * i))
    first = step(sched)
    assert ids(first) == ["r0"]  # the others wait for r0's blocks instead of computing them
    second = step(sched)
    starts = {s.request_id: s.start for s in second.scheduled}
    assert starts == {"r0": 12, "r1": 8, "r2": 8, "r3": 8}  # 2 cached blocks each
    assert second.stats.num_prefix_hit_tokens == 3 * 2 * BLOCK_SIZE
    run_until_done(sched)
    assert cache.usage() == 0.0


def test_off_computes_them_in_the_same_step():
    sched, _ = make_sched(defer_shared_prefixes=False)
    for i in range(3):
        sched.add_request(shared(f"r{i}", 1000 + 10 * i))
    assert ids(step(sched)) == ["r0", "r1", "r2"]


def test_unrelated_or_differently_keyed_prompts_are_not_deferred():
    sched, _ = make_sched()
    sched.add_request(shared("a", 1000))
    sched.add_request(Request("b", list(range(500, 512)), 3))  # another prefix
    sched.add_request(shared("c", 1010, extra_keys=(("salt", "tenant"),)))  # another cache key
    assert ids(step(sched)) == ["a", "b", "c"]


def test_a_deferred_request_holds_its_place_in_line():
    sched, _ = make_sched()
    sched.add_request(shared("a", 1000))
    sched.add_request(shared("b", 1010))
    sched.add_request(Request("c", list(range(500, 512)), 3))  # behind b: does not overtake it
    assert ids(step(sched)) == ["a"]
    assert ids(step(sched)) == ["a", "b", "c"]


def test_only_a_full_block_in_common_defers():
    sched, _ = make_sched()
    sched.add_request(shared("a", 1000))
    sched.add_request(Request("b", list(range(100, 106)), 3))  # block 0 full, then 2 tokens
    sched.add_request(Request("c", list(range(100, 103)), 3))  # no full block
    assert ids(step(sched)) == ["a"]  # b waits for block 0 (and c, behind it, waits too)
    second = step(sched)
    assert {s.request_id: s.start for s in second.scheduled} == {"a": 12, "b": 4, "c": 0}
