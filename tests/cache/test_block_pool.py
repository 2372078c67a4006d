import pytest
from kvpage_cache import (
    BlockPool,
    DoubleFreeError,
    InvalidArgumentError,
    KVCacheError,
    NoFreeBlocksError,
)


def free_order(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_queue]


def cache(pool: BlockPool, block_id: int, tag: int) -> None:
    key = pool.hasher.token_key([tag] * pool.block_size)
    pool.cache(block_id, pool.hasher.hash_block(b"", key, b""), key, b"")


def test_new_pool_is_all_free_in_id_order():
    pool = BlockPool(4, block_size=2)
    assert pool.num_free_blocks == 4
    assert free_order(pool) == [0, 1, 2, 3]


def test_allocate_takes_the_front_with_one_reference():
    pool = BlockPool(4, block_size=2)
    assert pool.allocate(2) == [0, 1]
    assert [pool.ref_count(i) for i in range(4)] == [1, 1, 0, 0]
    assert pool.num_free_blocks == 2


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(2, block_size=2)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(3)
    assert pool.num_free_blocks == 2


def test_freed_unhashed_blocks_go_to_the_front_hashed_ones_to_the_back():
    pool = BlockPool(4, block_size=2)
    a, b, c, _ = pool.allocate(4)
    cache(pool, b, tag=7)
    pool.free([c, b, a])  # tail first
    assert free_order(pool) == [a, c, b]


def test_tail_first_free_evicts_the_end_of_a_chain_first():
    pool = BlockPool(3, block_size=2)
    ids = pool.allocate(3)
    for tag, block_id in enumerate(ids):
        cache(pool, block_id, tag)
    pool.free(reversed(ids))
    assert free_order(pool) == [ids[2], ids[1], ids[0]]


def test_touch_revives_a_cached_free_block_from_the_middle():
    pool = BlockPool(3, block_size=2)
    ids = pool.allocate(3)
    for tag, block_id in enumerate(ids):
        cache(pool, block_id, tag)
    pool.free(ids)
    pool.touch([ids[1]])
    assert pool.ref_count(ids[1]) == 1
    assert free_order(pool) == [ids[0], ids[2]]
    assert pool.num_cached_blocks == 3


def test_touch_a_referenced_block_adds_a_reference():
    pool = BlockPool(2, block_size=2)
    (block_id,) = pool.allocate(1)
    pool.touch([block_id])
    assert pool.ref_count(block_id) == 2
    pool.free([block_id])
    assert pool.ref_count(block_id) == 1 and pool.num_free_blocks == 1


def test_allocating_a_cached_block_evicts_it():
    pool = BlockPool(1, block_size=2)
    (block_id,) = pool.allocate(1)
    cache(pool, block_id, tag=1)
    pool.free([block_id])
    assert pool.num_cached_blocks == 1
    assert pool.allocate(1) == [block_id]
    assert pool.num_cached_blocks == 0
    assert pool.block(block_id).block_hash is None
    assert pool.stats.evictions == 1


def test_double_free_raises():
    pool = BlockPool(2, block_size=2)
    (block_id,) = pool.allocate(1)
    pool.free([block_id])
    with pytest.raises(DoubleFreeError):
        pool.free([block_id])
    assert pool.num_free_blocks == 2


@pytest.mark.parametrize("block_id", [-1, 2])
def test_block_ids_out_of_range_raise(block_id):
    pool = BlockPool(2, block_size=2)
    with pytest.raises(InvalidArgumentError):
        pool.touch([block_id])
    with pytest.raises(InvalidArgumentError):
        pool.free([block_id])


@pytest.mark.parametrize("args", [(0, 16), (4, 0), (-1, 16)])
def test_pool_sizes_must_be_positive(args):
    with pytest.raises(InvalidArgumentError):
        BlockPool(*args)


def test_cache_same_content_twice_keeps_the_first_copy():
    pool = BlockPool(2, block_size=2)
    a, b = pool.allocate(2)
    key = pool.hasher.token_key([1, 2])
    block_hash = pool.hasher.hash_block(b"", key, b"")
    first = pool.cache(a, block_hash, key, b"")
    assert pool.cache(b, block_hash, key, b"") == first
    assert pool.cached_block(block_hash).block_id == a
    assert pool.block(b).block_hash is None


def test_cache_other_content_under_the_same_hash_replaces_it():
    pool = BlockPool(2, block_size=2)
    a, b = pool.allocate(2)
    block_hash = pool.hasher.hash_block(b"", pool.hasher.token_key([1, 2]), b"")
    pool.cache(a, block_hash, pool.hasher.token_key([1, 2]), b"")
    pool.cache(b, block_hash, pool.hasher.token_key([3, 4]), b"")  # forced collision
    assert pool.cached_block(block_hash).block_id == b
    assert pool.block(a).block_hash is None


def test_uncache_moves_a_free_block_to_the_front():
    pool = BlockPool(3, block_size=2)
    ids = pool.allocate(3)
    cache(pool, ids[2], tag=5)
    pool.free(ids)
    assert free_order(pool) == [ids[1], ids[0], ids[2]]
    pool.uncache(ids[2])
    assert free_order(pool) == [ids[2], ids[1], ids[0]]
    assert pool.num_cached_blocks == 0


def test_caching_a_cached_block_with_other_tokens_raises():
    pool = BlockPool(1, block_size=2)
    (block_id,) = pool.allocate(1)
    cache(pool, block_id, tag=1)
    with pytest.raises(KVCacheError, match="other tokens"):
        cache(pool, block_id, tag=2)


def test_reset_prefix_cache_forgets_cached_blocks_only_when_all_are_free():
    pool = BlockPool(3, block_size=2)
    a, b = pool.allocate(2)
    cache(pool, a, tag=1)
    cache(pool, b, tag=2)
    pool.free([a])
    assert not pool.reset_prefix_cache()  # b is still referenced
    assert pool.num_cached_blocks == 2
    pool.free([b])
    assert pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 0 and pool.num_free_blocks == 3
    assert all(pool.block(i).block_hash is None for i in range(3))
