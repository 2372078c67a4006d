"""Blocks and the intrusive doubly linked queue of free blocks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .block_hash import BlockHash
from .errors import NoFreeBlocksError


@dataclass(slots=True, eq=False)
class Block:
    """One KV block. While it is in the prefix cache, ``block_hash`` is set and the block
    remembers what it holds: ``token_key`` (its token ids, encoded) and ``parent`` (the
    ``content_id`` of the cached block before it, or the encoded extra keys for a first
    block). ``content_id`` is unique per caching, so a parent that was evicted and cached
    again is a different parent."""

    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    token_key: bytes = b""
    parent: int | bytes | None = None
    content_id: int = 0
    prev: Block | None = None
    next: Block | None = None

    def holds(self, token_key: bytes, parent: int | bytes) -> bool:
        """True when the cached content is exactly these tokens after exactly this parent."""
        return self.token_key == token_key and self.parent == parent

    def clear_cached(self) -> None:
        self.block_hash = None
        self.token_key = b""
        self.parent = None
        self.content_id = 0


class FreeBlockQueue:
    """Free blocks in eviction order, front first, linked through the blocks themselves so
    that pushing at either end, popping the front and removing from the middle are O(1).
    A block is in the queue exactly when its ``prev`` is set."""

    def __init__(self, blocks: Iterable[Block]) -> None:
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next = self._tail
        self._tail.prev = self._head
        self._len = 0
        for block in blocks:
            self.push_back(block)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, block: Block) -> bool:
        return block.prev is not None

    def __iter__(self) -> Iterator[Block]:
        block = self._head.next
        while block is not self._tail:
            yield block
            block = block.next

    def pop_front(self) -> Block:
        block = self._head.next
        if block is self._tail:
            raise NoFreeBlocksError("no free block left")
        self.remove(block)
        return block

    def push_front(self, block: Block) -> None:
        self._insert_after(self._head, block)

    def push_back(self, block: Block) -> None:
        self._insert_after(self._tail.prev, block)

    def remove(self, block: Block) -> None:
        block.prev.next = block.next
        block.next.prev = block.prev
        block.prev = block.next = None
        self._len -= 1

    def _insert_after(self, anchor: Block, block: Block) -> None:
        block.prev = anchor
        block.next = anchor.next
        anchor.next.prev = block
        anchor.next = block
        self._len += 1
