"""The block pool: block ids, reference counts, the free queue and the prefix-cache map."""

from __future__ import annotations

from collections.abc import Iterable

from .block_hash import BlockHash, BlockHasher, HashFn
from .errors import DoubleFreeError, InvalidArgumentError, KVCacheError, NoFreeBlocksError
from .free_queue import Block, FreeBlockQueue
from .stats import CacheStats


class BlockPool:
    """Owns ``num_blocks`` blocks of ``block_size`` token slots.

    A block is either referenced (``ref_count > 0``, held by one or more block tables) or in
    the free queue. A freed block that is in the prefix cache keeps its hash and content and
    goes to the back of the free queue (LRU), where a prefix hit can revive it; a freed block
    with no hash goes to the front, to be reused first. Allocation takes blocks from the
    front; taking a cached block evicts it from the cache. Every operation is O(1) per block.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        hash_fn: HashFn | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise InvalidArgumentError(
                f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hasher = BlockHasher(block_size, hash_fn)
        self.stats = CacheStats()
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self._cached: dict[BlockHash, Block] = {}
        self._next_content_id = 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now, cached-but-unreferenced ones included."""
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def block(self, block_id: int) -> Block:
        """The block with this id (read it, change it only through the pool)."""
        if not 0 <= block_id < self.num_blocks:
            raise InvalidArgumentError(f"block id {block_id} is not in 0..{self.num_blocks - 1}")
        return self.blocks[block_id]

    def ref_count(self, block_id: int) -> int:
        return self.block(block_id).ref_count

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks from the front of the free queue, each with ref_count 1."""
        if num_blocks > len(self.free_queue):
            raise NoFreeBlocksError(
                f"asked for {num_blocks} blocks, {len(self.free_queue)} are free"
            )
        block_ids = []
        for _ in range(num_blocks):
            block = self.free_queue.pop_front()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_count = 1
            block_ids.append(block.block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block, taking free (cached) ones out of the free queue."""
        for block_id in block_ids:
            block = self.block(block_id)
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop a reference to each block, in the order given (callers pass a table tail first)."""
        for block_id in block_ids:
            block = self.block(block_id)
            if block.ref_count == 0:
                raise DoubleFreeError(f"block {block_id} is already free")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self.free_queue.push_front(block)
                else:
                    self.free_queue.push_back(block)

    def cached_block(self, block_hash: BlockHash) -> Block | None:
        return self._cached.get(block_hash)

    def cache(
        self, block_id: int, block_hash: BlockHash, token_key: bytes, parent: int | bytes
    ) -> int:
        """Publish a full block; returns the content id under which its content is cached.

        If another block already caches the same content, that one stays the cached copy and
        its content id is returned. A different content under the same hash (a collision, or
        a stale block whose parent was evicted) is replaced.
        """
        block = self.block(block_id)
        if block.block_hash is not None:  # shared with the request that cached it first
            if block.token_key != token_key:
                raise KVCacheError(f"block {block_id} is cached with other tokens than committed")
            return block.content_id
        existing = self._cached.get(block_hash)
        if existing is not None:
            if existing.holds(token_key, parent):
                return existing.content_id
            self.uncache(existing.block_id)
        block.block_hash = block_hash
        block.token_key = token_key
        block.parent = parent
        block.content_id = self._next_content_id
        self._next_content_id += 1
        self._cached[block_hash] = block
        return block.content_id

    def uncache(self, block_id: int) -> None:
        """Drop a block from the prefix cache (its content is about to change)."""
        block = self.block(block_id)
        if block.block_hash is None:
            return
        del self._cached[block.block_hash]
        block.clear_cached()
        if block.ref_count == 0:
            self.free_queue.remove(block)
            self.free_queue.push_front(block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, for when their KV can no longer be trusted. Only done
        while no block is referenced; returns False (and changes nothing) otherwise."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in list(self._cached.values()):
            self.uncache(block.block_id)
        return True

    def _evict(self, block: Block) -> None:
        del self._cached[block.block_hash]
        block.clear_cached()
        self.stats.evictions += 1
