import pytest
from kvpage_cache import (
    CACHE_SALT,
    LORA,
    NULL_BLOCK,
    BlockPool,
    DoubleFreeError,
    DuplicateRequestError,
    InvalidArgumentError,
    KVCacheManager,
    RequestTooLargeError,
    StaleHitError,
    UnknownRequestError,
    sha256,
)

BS = 4


def make(num_blocks=8, **kwargs) -> KVCacheManager:
    window = kwargs.pop("sliding_window", None)
    return KVCacheManager(BlockPool(num_blocks, BS, **kwargs), sliding_window=window)


def prefill(mgr, request_id, tokens, extra_keys=()):
    """Look the prompt up, allocate the rest, write and commit it, like a scheduler step."""
    hit = mgr.lookup_prefix(request_id, tokens, extra_keys)
    new = mgr.allocate_slots(request_id, len(tokens) - hit.num_tokens, hit.block_ids)
    assert new is not None
    mgr.commit_full_blocks(request_id, tokens, extra_keys)
    return hit


def refs(mgr):
    return [mgr.pool.ref_count(i) for i in range(mgr.num_blocks)]


# ---- sizes ---------------------------------------------------------------------------


def test_sizes_and_usage():
    mgr = make()
    assert (mgr.block_size, mgr.num_blocks, mgr.num_free_blocks) == (BS, 8, 8)
    assert [mgr.num_blocks_needed(n) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert mgr.can_ever_fit(32) and not mgr.can_ever_fit(33)
    mgr.allocate_slots("a", 6)
    assert mgr.usage() == 2 / 8 and mgr.num_free_blocks == 6
    assert mgr.num_tokens("a") == 6 and "a" in mgr and "b" not in mgr


# ---- lookup and commit ---------------------------------------------------------------


def test_lookup_on_an_empty_cache_misses():
    hit = make().lookup_prefix("a", list(range(10)))
    assert hit.block_ids == [] and hit.num_tokens == 0


def test_committed_blocks_are_hit_by_the_next_request():
    mgr = make()
    prefill(mgr, "a", list(range(10)))
    hit = mgr.lookup_prefix("b", list(range(9)) + [99])
    assert hit.block_ids == mgr.block_ids("a")[:2] and hit.num_tokens == 8


def test_reset_prefix_cache_needs_every_request_gone():
    mgr = make()
    prefill(mgr, "a", list(range(10)))
    assert not mgr.reset_prefix_cache()
    mgr.free("a")
    assert mgr.lookup_prefix("b", list(range(10))).num_tokens == 8
    assert mgr.reset_prefix_cache()
    assert mgr.lookup_prefix("b", list(range(10))).num_tokens == 0


def test_the_miss_names_the_block_two_prompts_share():
    mgr = make()
    a = mgr.lookup_prefix("a", list(range(10)))
    b = mgr.lookup_prefix("b", list(range(8)) + [99, 98])  # same two blocks, other tail
    c = mgr.lookup_prefix("c", [7] + list(range(1, 10)))  # another first block
    salted = mgr.lookup_prefix("d", list(range(10)), ((CACHE_SALT, "t"),))
    assert a.next_block_hash is not None and a.next_block_hash == b.next_block_hash
    assert c.next_block_hash != a.next_block_hash != salted.next_block_hash
    prefill(mgr, "a", list(range(10)))
    assert mgr.lookup_prefix("e", list(range(9))).next_block_hash is None  # nothing left to miss
    uncached = make(enable_prefix_caching=False)
    assert uncached.lookup_prefix("f", list(range(10))).next_block_hash is None


def test_a_full_prompt_hit_leaves_the_last_token_to_compute():
    mgr = make()
    prefill(mgr, "a", list(range(8)))
    hit = mgr.lookup_prefix("b", list(range(8)))
    assert hit.num_tokens == 4
    assert mgr.lookup_prefix("c", list(range(9))).num_tokens == 8


def test_hit_stops_at_the_first_differing_block():
    mgr = make()
    prefill(mgr, "a", list(range(12)) + [0])
    assert mgr.lookup_prefix("b", [0, 1, 2, 3, 9, 5, 6, 7, 8, 9, 10, 11, 0]).num_tokens == 4


def test_extra_keys_separate_the_cache():
    mgr = make(16)
    tokens = list(range(9))
    prefill(mgr, "a", tokens, ((LORA, "x"),))
    assert mgr.lookup_prefix("b", tokens).num_tokens == 0
    assert mgr.lookup_prefix("b", tokens, ((CACHE_SALT, "x"),)).num_tokens == 0
    assert mgr.lookup_prefix("b", tokens, ((LORA, "x"),)).num_tokens == 8


def test_commit_publishes_only_new_full_blocks():
    mgr = make()
    tokens = list(range(7))
    mgr.allocate_slots("a", 7)
    mgr.commit_full_blocks("a", tokens[:3])
    assert mgr.pool.num_cached_blocks == 0
    mgr.commit_full_blocks("a", tokens)
    assert mgr.pool.num_cached_blocks == 1
    mgr.allocate_slots("a", 1)
    mgr.commit_full_blocks("a", tokens + [7])
    assert mgr.pool.num_cached_blocks == 2


def test_commit_past_the_slots_raises():
    mgr = make()
    mgr.allocate_slots("a", 4)
    with pytest.raises(InvalidArgumentError, match="slots for 4"):
        mgr.commit_full_blocks("a", list(range(5)))


def test_disabled_prefix_caching_never_hits():
    mgr = make(enable_prefix_caching=False)
    prefill(mgr, "a", list(range(9)))
    assert mgr.pool.num_cached_blocks == 0
    assert mgr.lookup_prefix("b", list(range(9))).num_tokens == 0


def test_freed_blocks_stay_cached_until_evicted():
    mgr = make(4)
    prefill(mgr, "a", list(range(9)))  # 3 blocks, 2 cached
    mgr.free("a")
    assert mgr.num_free_blocks == 4
    assert mgr.lookup_prefix("b", list(range(9))).num_tokens == 8
    mgr.allocate_slots("c", 12)  # the unhashed blocks first, then the LRU cached one
    assert mgr.lookup_prefix("b", list(range(9))).num_tokens == 4
    assert mgr.stats.evictions == 1


# ---- allocation ----------------------------------------------------------------------


def test_first_allocation_revives_hit_blocks_from_the_free_queue():
    mgr = make()
    prefill(mgr, "a", list(range(9)))
    mgr.free("a")
    hit = mgr.lookup_prefix("b", list(range(9)))
    free_before = mgr.num_free_blocks
    new = mgr.allocate_slots("b", 1, hit.block_ids)
    assert mgr.block_ids("b") == hit.block_ids + new
    assert mgr.num_tokens("b") == 9
    assert mgr.num_free_blocks == free_before - 3
    assert all(mgr.pool.ref_count(b) == 1 for b in mgr.block_ids("b"))


def test_allocation_grows_the_table_block_by_block():
    mgr = make()
    assert len(mgr.allocate_slots("a", 5)) == 2
    assert mgr.allocate_slots("a", 3) == []
    assert len(mgr.allocate_slots("a", 1)) == 1
    assert mgr.num_tokens("a") == 9


def test_lookahead_slots_are_allocated_but_not_counted():
    mgr = make()
    mgr.allocate_slots("a", 4)
    assert len(mgr.allocate_slots("a", 1, num_lookahead_tokens=4)) == 2
    assert mgr.num_tokens("a") == 5


def test_allocation_that_does_not_fit_returns_none_and_changes_nothing():
    mgr = make(4)
    prefill(mgr, "a", list(range(9)))
    mgr.free("a")
    hit = mgr.lookup_prefix("b", list(range(9)))
    mgr.allocate_slots("other", 8)  # takes the two unhashed blocks
    before = (refs(mgr), mgr.num_free_blocks, mgr.pool.num_cached_blocks)
    assert mgr.allocate_slots("b", 5, hit.block_ids) is None
    assert (refs(mgr), mgr.num_free_blocks, mgr.pool.num_cached_blocks) == before
    assert "b" not in mgr
    mgr.allocate_slots("third", 4)
    assert mgr.allocate_slots("other", 8) is None
    assert mgr.num_tokens("other") == 8 and len(mgr.block_ids("other")) == 2
    assert mgr.num_free_blocks == 1


def test_a_request_larger_than_the_pool_raises():
    mgr = make(2)
    with pytest.raises(RequestTooLargeError, match="whole pool has 2"):
        mgr.allocate_slots("a", 9)
    assert "a" not in mgr and mgr.num_free_blocks == 2


def test_negative_counts_raise():
    mgr = make()
    with pytest.raises(InvalidArgumentError):
        mgr.allocate_slots("a", -1)
    with pytest.raises(InvalidArgumentError):
        mgr.allocate_slots("a", 1, num_lookahead_tokens=-1)


def test_computed_blocks_after_the_first_call_raise():
    mgr = make()
    prefill(mgr, "a", list(range(5)))
    with pytest.raises(InvalidArgumentError, match="first call"):
        mgr.allocate_slots("a", 1, [0])


def test_a_stale_hit_raises():
    mgr = make(2)
    prefill(mgr, "a", list(range(5)))
    mgr.free("a")
    hit = mgr.lookup_prefix("b", list(range(5)))
    mgr.allocate_slots("c", 8)  # evicts the hit block
    mgr.free("c")
    with pytest.raises(StaleHitError):
        mgr.allocate_slots("b", 1, hit.block_ids)


# ---- free ----------------------------------------------------------------------------


def test_free_gives_back_every_block_tail_first():
    mgr = make(4)
    prefill(mgr, "a", list(range(13)))  # 4 blocks, the first 3 cached
    table = mgr.block_ids("a")
    mgr.free("a")
    assert [b.block_id for b in mgr.pool.free_queue] == [table[3], table[2], table[1], table[0]]


def test_free_unknown_and_double_free_raise():
    mgr = make()
    with pytest.raises(UnknownRequestError, match="'x'"):
        mgr.free("x")
    mgr.allocate_slots("a", 3)
    mgr.free("a")
    with pytest.raises(DoubleFreeError):
        mgr.free("a")
    assert mgr.num_free_blocks == 8
    mgr.allocate_slots("a", 3)  # a freed id can start again
    mgr.free("a")


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.num_tokens("x"),
        lambda m: m.block_ids("x"),
        lambda m: m.commit_full_blocks("x", []),
        lambda m: m.truncate("x", 0),
        lambda m: m.fork("x", "y"),
    ],
)
def test_unknown_request_ids_raise(call):
    with pytest.raises(UnknownRequestError):
        call(make())


# ---- fork and copy-on-write ----------------------------------------------------------


def test_fork_shares_every_block_including_the_partial_one():
    mgr = make()
    prefill(mgr, "p", list(range(6)))
    assert mgr.fork("p", "c") == []
    assert mgr.block_ids("c") == mgr.block_ids("p")
    assert mgr.num_tokens("c") == 6
    assert all(mgr.pool.ref_count(b) == 2 for b in mgr.block_ids("p"))


def test_first_write_into_a_shared_partial_block_copies_it():
    mgr = make()
    prefill(mgr, "p", list(range(6)))
    mgr.fork("p", "c")
    shared_partial = mgr.block_ids("p")[1]
    assert mgr.allocate_slots("c", 1) == []
    copy = mgr.block_ids("c")[1]
    assert copy != shared_partial
    assert mgr.take_block_copies() == [(shared_partial, copy)]
    assert mgr.take_block_copies() == []
    assert mgr.pool.ref_count(shared_partial) == 1
    mgr.allocate_slots("p", 1)  # now private again: written in place
    assert mgr.block_ids("p")[1] == shared_partial
    assert mgr.take_block_copies() == []
    assert mgr.stats.cow_copies == 1


def test_fork_on_a_block_boundary_needs_no_copy():
    mgr = make()
    prefill(mgr, "p", list(range(8)))
    mgr.fork("p", "c")
    assert len(mgr.allocate_slots("c", 1)) == 1
    assert mgr.take_block_copies() == []


def test_copy_on_write_that_does_not_fit_returns_none():
    mgr = make(2)
    mgr.allocate_slots("p", 6)
    mgr.fork("p", "c")
    assert mgr.allocate_slots("c", 1) is None
    assert mgr.take_block_copies() == [] and mgr.num_tokens("c") == 6


def test_fork_into_an_existing_request_raises():
    mgr = make()
    mgr.allocate_slots("p", 1)
    mgr.allocate_slots("c", 1)
    with pytest.raises(DuplicateRequestError):
        mgr.fork("p", "c")


# ---- truncate ------------------------------------------------------------------------


def test_truncate_gives_back_blocks_no_longer_needed():
    mgr = make()
    mgr.allocate_slots("a", 10)
    table = mgr.block_ids("a")
    mgr.truncate("a", 5)
    assert mgr.block_ids("a") == table[:2] and mgr.num_tokens("a") == 5
    assert mgr.num_free_blocks == 6
    mgr.truncate("a", 0)
    assert mgr.block_ids("a") == [] and mgr.num_free_blocks == 8


def test_truncate_accepts_tokens_written_into_lookahead_slots():
    mgr = make()
    mgr.allocate_slots("a", 4)
    mgr.allocate_slots("a", 1, num_lookahead_tokens=5)  # slots up to 10
    mgr.truncate("a", 7)  # 2 of the drafts accepted
    assert mgr.num_tokens("a") == 7 and len(mgr.block_ids("a")) == 2
    with pytest.raises(InvalidArgumentError, match="0..7"):
        mgr.truncate("a", 8)


def test_truncate_out_of_range_raises():
    mgr = make()
    mgr.allocate_slots("a", 4)
    for bad in (-1, 5):
        with pytest.raises(InvalidArgumentError):
            mgr.truncate("a", bad)


def test_a_rolled_back_cached_block_is_uncached_before_it_is_written():
    mgr = make()
    tokens = list(range(9))
    prefill(mgr, "a", tokens)
    cached = mgr.block_ids("a")[1]
    mgr.truncate("a", 6)
    assert mgr.lookup_prefix("b", tokens).num_tokens == 8  # content still intact
    mgr.allocate_slots("a", 1)
    assert mgr.block_ids("a")[1] == cached and mgr.take_block_copies() == []
    assert mgr.lookup_prefix("b", tokens).num_tokens == 4


def test_a_rolled_back_block_shared_by_a_hit_is_copied_before_it_is_written():
    mgr = make()
    tokens = list(range(9))
    prefill(mgr, "a", tokens)
    prefill(mgr, "b", tokens)
    shared = mgr.block_ids("a")[1]
    mgr.truncate("a", 6)
    mgr.allocate_slots("a", 1)
    (copy,) = [dst for src, dst in mgr.take_block_copies() if src == shared]
    assert mgr.block_ids("a")[1] == copy and mgr.block_ids("b")[1] == shared
    assert mgr.lookup_prefix("c", tokens).num_tokens == 8


# ---- sliding window ------------------------------------------------------------------


def test_blocks_outside_the_window_are_released():
    mgr = make(sliding_window=4)
    mgr.allocate_slots("a", 14)
    table = mgr.block_ids("a")
    assert mgr.free_outside_window("a", 8) == 1  # block 0 ends before position 8 - 4
    assert mgr.free_outside_window("a", 8) == 0
    assert mgr.free_outside_window("a", 14) == 1
    assert mgr.block_ids("a") == [NULL_BLOCK, NULL_BLOCK] + table[2:]
    assert mgr.num_free_blocks == 6
    with pytest.raises(InvalidArgumentError):
        mgr.truncate("a", 7)  # would need a released block again
    mgr.allocate_slots("a", 2)
    mgr.free("a")
    assert mgr.num_free_blocks == 8


def test_window_release_needs_a_window():
    with pytest.raises(InvalidArgumentError, match="sliding_window"):
        make().free_outside_window("a", 0)
    with pytest.raises(InvalidArgumentError):
        make(sliding_window=0)


# ---- stats ---------------------------------------------------------------------------


def test_stats_count_queries_hits_and_tokens():
    mgr = make(16)
    prefill(mgr, "a", list(range(9)))
    prefill(mgr, "b", list(range(9)))
    stats = mgr.stats
    assert (stats.queries, stats.query_tokens, stats.hits, stats.hit_tokens) == (2, 18, 1, 8)
    assert stats.hit_rate == 8 / 18 and stats.request_hit_rate == 0.5
    stats.reset()
    assert stats.queries == 0 and stats.hit_rate == 0.0


# ---- hash collisions -----------------------------------------------------------------


def test_a_constant_hash_never_serves_other_tokens():
    mgr = make(16, hash_fn=lambda data: b"same")
    prefill(mgr, "a", list(range(5)))
    assert mgr.pool.num_cached_blocks == 1
    assert mgr.lookup_prefix("b", [7] * 5).num_tokens == 0
    assert mgr.lookup_prefix("b", [0, 1, 2, 3, 7]).num_tokens == 4


def test_a_hash_blind_to_the_parent_never_serves_a_block_computed_after_another_prefix():
    """The weak hash sees only the block's own tokens, so block 1 after [0..3] and block 1
    after [9..9] collide; the stored parent identity still tells them apart."""
    mgr = make(16, hash_fn=lambda data: data[-4 * 8 :])
    head_a, head_b, tail = [0, 1, 2, 3], [9, 9, 9, 9], [5, 6, 7, 8]
    prefill(mgr, "a", head_a + tail + [0])
    prefill(mgr, "b", head_b + tail + [0])  # replaces the colliding cache entry
    hit = mgr.lookup_prefix("c", head_a + tail + [0])
    assert hit.block_ids == mgr.block_ids("a")[:1]
    hit = mgr.lookup_prefix("c", head_b + tail + [0])
    assert hit.block_ids == mgr.block_ids("b")[:2]


def test_a_lookup_counts_once_when_its_request_is_first_allocated():
    mgr = make(3)
    prefill(mgr, "a", list(range(9)))  # holds all 3 blocks
    for _ in range(3):  # a prompt waiting for room is looked up at every step
        hit = mgr.lookup_prefix("b", list(range(9)))
        assert mgr.allocate_slots("b", 9 - hit.num_tokens, hit.block_ids) is None
    assert (mgr.stats.queries, mgr.stats.query_tokens) == (1, 9)  # only "a" so far
    mgr.free("a")
    hit = mgr.lookup_prefix("b", list(range(9)))
    mgr.allocate_slots("b", 9 - hit.num_tokens, hit.block_ids)
    stats = mgr.stats
    assert (stats.queries, stats.query_tokens, stats.hits, stats.hit_tokens) == (2, 18, 1, 8)
    mgr.allocate_slots("b", 1)  # later allocations count nothing
    mgr.lookup_prefix("c", list(range(9)))  # a lookup no allocation adopts counts nothing
    assert (stats.queries, stats.query_tokens) == (2, 18)


def test_a_repeated_lookup_of_a_request_reuses_its_block_hashes():
    hashed = []

    def counting_sha(data: bytes) -> bytes:
        hashed.append(data)
        return sha256(data)

    mgr = make(16, hash_fn=counting_sha)
    tokens = list(range(13))
    prefill(mgr, "a", tokens)
    hashed.clear()
    first = mgr.lookup_prefix("b", tokens)
    assert len(hashed) == 3 and first.num_tokens == 12
    again = mgr.lookup_prefix("b", tokens)
    assert len(hashed) == 3 and again == first  # nothing hashed again
    other = mgr.lookup_prefix("b", tokens[:4] + [99] + tokens[5:])  # same id, other tokens
    assert len(hashed) == 4 and other.num_tokens == 4  # hashed from the block that differs
    salted = mgr.lookup_prefix("b", tokens, ((CACHE_SALT, "t"),))
    assert len(hashed) == 5 and salted.num_tokens == 0  # other extra keys: hashed anew


def test_block_table_is_the_table_itself():
    mgr = make()
    mgr.allocate_slots("a", 5)
    table = mgr.block_table("a")
    assert table == mgr.block_ids("a") and mgr.block_ids("a") is not mgr.block_ids("a")
    mgr.allocate_slots("a", 4)
    assert len(table) == 3 and table == mgr.block_ids("a")  # it follows the request
    with pytest.raises(UnknownRequestError):
        mgr.block_table("x")


def test_decoding_into_the_allocated_slots_adds_no_block():
    mgr = make()
    mgr.allocate_slots("a", 5, (), 3)  # 8 slots: 5 tokens and 3 lookahead slots
    table = mgr.block_ids("a")
    assert [mgr.allocate_slots("a", 1) for _ in range(3)] == [[], [], []]
    assert mgr.num_tokens("a") == 8 and mgr.block_ids("a") == table
    assert len(mgr.allocate_slots("a", 1)) == 1 and mgr.num_tokens("a") == 9
    with pytest.raises(InvalidArgumentError):
        mgr.allocate_slots("a", -1)
    with pytest.raises(InvalidArgumentError):
        mgr.allocate_slots("a", 1, (), -1)
