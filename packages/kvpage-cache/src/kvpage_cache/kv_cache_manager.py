"""Per-request block tables over a BlockPool.

A request's table maps its token positions to blocks: position ``p`` lives in block
``table[p // block_size]`` at offset ``p % block_size``. The manager tracks per request how
many tokens have slots (``num_tokens``) and which leading full blocks it has committed to the
prefix cache. Blocks are shared by reference count: a prefix hit shares cached full blocks, a
fork shares every block including the partial last one, and the first write into a shared
partial block copies it (copy-on-write).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .block_hash import BlockHash, ExtraKeys, encode_extra_keys
from .block_pool import BlockPool
from .errors import (
    DoubleFreeError,
    DuplicateRequestError,
    InvalidArgumentError,
    RequestTooLargeError,
    StaleHitError,
    UnknownRequestError,
)
from .free_queue import Block
from .stats import CacheStats

NULL_BLOCK = -1
"""Table entry of a position released by ``free_outside_window``: it holds no block."""

_FREED_IDS_REMEMBERED = 4096  # recently freed request ids kept to tell a double free apart


@dataclass(slots=True)
class PrefixHit:
    """Cached full blocks that hold a prompt's prefix. They are not referenced yet: pass them
    to ``allocate_slots`` as ``computed_blocks`` before the pool allocates anything else.

    ``next_block_hash`` is the hash of the full block right after the hit, which the lookup
    found uncached (None when there is no such block to look up): two prompts with the same
    one need the same block.
    """

    block_ids: list[int]
    num_tokens: int
    next_block_hash: BlockHash | None = None


@dataclass(slots=True)
class _Lookup:
    """The latest prefix lookup, kept until ``allocate_slots`` adopts it for the same request."""

    request_id: str
    extra: bytes  # encoded extra keys
    num_tokens: int  # tokens looked up
    chain: list[tuple[bytes, BlockHash]]  # (token key, chained hash) of each block hashed


@dataclass(slots=True)
class _RequestState:
    block_ids: list[int]
    num_tokens: int = 0
    # Chained hash and cached content id of each committed full block (content id None: the
    # block could not be cached, so the blocks after it are not cached either).
    block_hashes: list[BlockHash] = field(default_factory=list)
    content_ids: list[int | None] = field(default_factory=list)
    num_released: int = 0  # leading table positions set to NULL_BLOCK (sliding window)
    slots_end: int = 0  # end of the private slots reserved by the last allocate (lookahead)


class KVCacheManager:
    """Block tables, prefix lookup, slot allocation, fork with copy-on-write, roll-back."""

    def __init__(self, pool: BlockPool, *, sliding_window: int | None = None) -> None:
        if sliding_window is not None and sliding_window <= 0:
            raise InvalidArgumentError(f"sliding_window must be positive, got {sliding_window}")
        self.pool = pool
        self.block_size = pool.block_size
        self.sliding_window = sliding_window
        self.stats: CacheStats = pool.stats
        self._requests: dict[str, _RequestState] = {}
        self._freed_ids: dict[str, None] = {}  # insertion-ordered set, oldest first
        self._copies: list[tuple[int, int]] = []
        self._last_lookup: _Lookup | None = None

    # ---- sizes -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        return self.num_blocks_needed(num_tokens) <= self.pool.num_blocks

    def usage(self) -> float:
        """Fraction of blocks referenced by some request (cached free blocks count as free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def num_tokens(self, request_id: str) -> int:
        return self._state(request_id).num_tokens

    def block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table."""
        return list(self._state(request_id).block_ids)

    def block_table(self, request_id: str) -> Sequence[int]:
        """The request's block table itself, without a copy: read it, never change it. It
        follows the request's later ``allocate_slots``, ``truncate`` and
        ``free_outside_window`` calls; read it before them when the table of now matters."""
        try:
            return self._requests[request_id].block_ids
        except KeyError:
            raise UnknownRequestError(request_id) from None

    # ---- prefix cache ------------------------------------------------------------------

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache; only possible (True) while no request holds a block."""
        return not self._requests and self.pool.reset_prefix_cache()

    def lookup_prefix(
        self, request_id: str, token_ids: Sequence[int], extra_keys: ExtraKeys = ()
    ) -> PrefixHit:
        """Longest run of cached full blocks holding a prefix of ``token_ids``, never all of
        them (the last token is always left to compute).

        A lookup counts in ``stats`` when ``allocate_slots`` adopts it (the request's first
        allocation), so a prompt that waits for room, looked up again every step, counts once.
        Such a repeated lookup of the same request also reuses the block hashes of the last one.
        """
        extra = encode_extra_keys(extra_keys)
        last = self._last_lookup
        again = last is not None and last.request_id == request_id and last.extra == extra
        known = last.chain if again else []
        chain: list[tuple[bytes, BlockHash]] = []
        self._last_lookup = _Lookup(request_id, extra, len(token_ids), chain)
        if not self.pool.enable_prefix_caching:
            return PrefixHit([], 0)
        size, hasher = self.block_size, self.pool.hasher
        block_ids: list[int] = []
        parent_hash, parent = b"", extra
        for index, start in enumerate(range(0, (len(token_ids) - 1) // size * size, size)):
            key = hasher.token_key(token_ids[start : start + size])
            if index < len(known) and known[index][0] == key:
                block_hash = known[index][1]
            else:
                known = []  # the two chains part here: no later hash of the old one applies
                block_hash = hasher.hash_block(parent_hash, key, extra)
            chain.append((key, block_hash))
            block = self.pool.cached_block(block_hash)
            if block is None or not block.holds(key, parent):
                return PrefixHit(block_ids, len(block_ids) * size, block_hash)
            block_ids.append(block.block_id)
            parent_hash, parent = block_hash, block.content_id
        return PrefixHit(block_ids, len(block_ids) * size)

    def _count_lookup(self, request_id: str, num_hit_blocks: int) -> None:
        """Count the request's last lookup in the stats, now that its first allocation adopts it."""
        lookup = self._last_lookup
        if lookup is None or lookup.request_id != request_id:
            return
        self._last_lookup = None
        stats = self.stats
        stats.queries += 1
        stats.query_tokens += lookup.num_tokens
        if num_hit_blocks:
            stats.hits += 1
            stats.hit_tokens += num_hit_blocks * self.block_size

    def commit_full_blocks(
        self, request_id: str, token_ids: Sequence[int], extra_keys: ExtraKeys = ()
    ) -> None:
        """Publish every full block of ``token_ids`` (the tokens whose KV is written) that the
        request has not committed yet."""
        state = self._state(request_id)
        if len(token_ids) > state.num_tokens:
            raise InvalidArgumentError(
                f"request {request_id!r} has slots for {state.num_tokens} tokens, "
                f"cannot commit {len(token_ids)}"
            )
        first, end = len(state.block_hashes), len(token_ids) // self.block_size
        if not self.pool.enable_prefix_caching or first >= end:
            return
        size = self.block_size
        hasher = self.pool.hasher
        extra = encode_extra_keys(extra_keys)
        parent_hash = state.block_hashes[-1] if first else b""
        parent = state.content_ids[-1] if first else extra
        for index in range(first, end):
            key = hasher.token_key(token_ids[index * size : (index + 1) * size])
            block_hash = hasher.hash_block(parent_hash, key, extra)
            block_id = state.block_ids[index]
            if parent is None or block_id == NULL_BLOCK:
                content_id = None
            else:
                content_id = self.pool.cache(block_id, block_hash, key, parent)
            state.block_hashes.append(block_hash)
            state.content_ids.append(content_id)
            parent_hash, parent = block_hash, content_id

    # ---- allocation --------------------------------------------------------------------

    def allocate_slots(
        self,
        request_id: str,
        num_new_tokens: int,
        computed_blocks: Sequence[int] = (),
        num_lookahead_tokens: int = 0,
    ) -> list[int] | None:
        """Give the request slots for ``num_new_tokens`` more tokens (plus lookahead slots,
        which are not counted as tokens). On the first call the table starts as
        ``computed_blocks`` (a prefix hit). Returns the new block ids, or None when they do not
        fit, in which case nothing changed."""
        state = self._requests.get(request_id)
        if state is not None and not computed_blocks and num_new_tokens >= 0:
            # The common decode: the table has the slots, and the block the next token goes
            # into is a fresh one or a partial block private to the request and not cached.
            size = self.block_size
            num_tokens = state.num_tokens + num_new_tokens
            slots_end = num_tokens + num_lookahead_tokens
            if num_tokens <= slots_end <= len(state.block_ids) * size:
                partial = None
                if state.num_tokens % size:
                    partial = self.pool.blocks[state.block_ids[state.num_tokens // size]]
                if partial is None or (partial.ref_count == 1 and partial.block_hash is None):
                    state.num_tokens, state.slots_end = num_tokens, slots_end
                    return []
        return self._allocate(request_id, state, num_new_tokens, computed_blocks,
                              num_lookahead_tokens)

    def _allocate(
        self,
        request_id: str,
        state: _RequestState | None,
        num_new_tokens: int,
        computed_blocks: Sequence[int],
        num_lookahead_tokens: int,
    ) -> list[int] | None:
        """``allocate_slots`` when blocks are added, copied or revived, or the request is new."""
        if num_new_tokens < 0 or num_lookahead_tokens < 0:
            raise InvalidArgumentError(
                f"token counts must be >= 0, got num_new_tokens={num_new_tokens}, "
                f"num_lookahead_tokens={num_lookahead_tokens}"
            )
        is_new = state is None
        if is_new:
            state = self._state_from_hit(computed_blocks)
        elif computed_blocks:
            raise InvalidArgumentError(
                f"request {request_id!r} already has a table: computed_blocks is for the first call"
            )
        num_needed = self.num_blocks_needed(
            state.num_tokens + num_new_tokens + num_lookahead_tokens
        )
        if num_needed - state.num_released > self.pool.num_blocks:
            raise RequestTooLargeError(num_needed, self.pool.num_blocks, self.block_size)
        num_new_blocks = max(0, num_needed - len(state.block_ids))
        partial = self._partial_block(state) if num_new_tokens or num_lookahead_tokens else None
        copy_partial = partial is not None and partial.ref_count > 1
        num_revived = self._num_free(state.block_ids) if is_new else 0
        if num_new_blocks + copy_partial + num_revived > self.pool.num_free_blocks:
            return None
        if is_new:
            self.pool.touch(state.block_ids)
            self._requests[request_id] = state
            self._freed_ids.pop(request_id, None)
            self._count_lookup(request_id, len(state.block_ids))
        if partial is not None:
            self._make_private(state, partial)
        new_block_ids = self.pool.allocate(num_new_blocks) if num_new_blocks else []
        state.block_ids.extend(new_block_ids)
        state.num_tokens += num_new_tokens
        state.slots_end = state.num_tokens + num_lookahead_tokens
        return new_block_ids

    def take_block_copies(self) -> list[tuple[int, int]]:
        """Drain the queued copy-on-write (src, dst) pairs: copy them before the next forward."""
        copies, self._copies = self._copies, []
        return copies

    def _state_from_hit(self, computed_blocks: Sequence[int]) -> _RequestState:
        state = _RequestState(list(computed_blocks), len(computed_blocks) * self.block_size)
        for block_id in state.block_ids:
            block = self.pool.block(block_id)
            if block.block_hash is None:
                raise StaleHitError(
                    f"computed block {block_id} is no longer cached: look the prefix up again"
                )
            state.block_hashes.append(block.block_hash)
            state.content_ids.append(block.content_id)
        return state

    def _num_free(self, block_ids: list[int]) -> int:
        blocks = self.pool.blocks
        return sum(1 for block_id in block_ids if blocks[block_id].ref_count == 0)

    def _partial_block(self, state: _RequestState) -> Block | None:
        """The partially filled block the next token goes into, if any."""
        if state.num_tokens % self.block_size == 0:
            return None
        return self.pool.blocks[state.block_ids[state.num_tokens // self.block_size]]

    def _make_private(self, state: _RequestState, partial: Block) -> None:
        """Before the partial block is written: copy it if others hold it too (copy-on-write);
        drop it from the prefix cache if a roll-back left it there."""
        if partial.ref_count > 1:
            (copy_id,) = self.pool.allocate(1)
            self.pool.free((partial.block_id,))
            state.block_ids[state.num_tokens // self.block_size] = copy_id
            self._copies.append((partial.block_id, copy_id))
            self.stats.cow_copies += 1
        elif partial.block_hash is not None:
            self.pool.uncache(partial.block_id)

    # ---- sharing, roll-back, release ---------------------------------------------------

    def fork(self, parent_id: str, child_id: str) -> list[tuple[int, int]]:
        """The child shares every block holding the parent's tokens, the partial last one
        included; whichever writes into that one first gets its own copy. Returns [] (the
        copies happen later, through ``take_block_copies``)."""
        parent = self._state(parent_id)
        if child_id in self._requests:
            raise DuplicateRequestError(child_id)
        shared = parent.block_ids[: self.num_blocks_needed(parent.num_tokens)]
        self.pool.touch(block_id for block_id in shared if block_id != NULL_BLOCK)
        self._requests[child_id] = _RequestState(
            shared,
            parent.num_tokens,
            parent.block_hashes.copy(),
            parent.content_ids.copy(),
            parent.num_released,
            parent.num_tokens,
        )
        self._freed_ids.pop(child_id, None)
        return []

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Set the request's token count to ``num_tokens`` and give back the blocks it no
        longer needs, tail first. Below the current count this rolls tokens back; above it, up
        to the lookahead slots reserved by the last ``allocate_slots``, it accepts speculative
        tokens written there. A cached block that becomes partial stays cached until the
        request writes into it (then it is copied or uncached first)."""
        state = self._state(request_id)
        lowest = state.num_released * self.block_size
        highest = max(state.num_tokens, state.slots_end)
        if not lowest <= num_tokens <= highest:
            raise InvalidArgumentError(
                f"cannot truncate request {request_id!r} to {num_tokens} tokens: "
                f"the range is {lowest}..{highest}"
            )
        keep = self.num_blocks_needed(num_tokens)
        self.pool.free(reversed(state.block_ids[keep:]))
        del state.block_ids[keep:]
        num_full = num_tokens // self.block_size
        del state.block_hashes[num_full:]
        del state.content_ids[num_full:]
        state.num_tokens = state.slots_end = num_tokens

    def free_outside_window(self, request_id: str, num_computed_tokens: int) -> int:
        """Release the blocks that no token from ``num_computed_tokens`` on can attend to
        under the sliding window; their table entries become ``NULL_BLOCK``. A block is
        released once it lies wholly before position ``num_computed_tokens - sliding_window``
        (one token of slack, whichever way the window counts its own token). Returns the
        number of blocks released."""
        if self.sliding_window is None:
            raise InvalidArgumentError("this manager was built without a sliding_window")
        state = self._state(request_id)
        if not 0 <= num_computed_tokens <= state.num_tokens:
            raise InvalidArgumentError(
                f"num_computed_tokens={num_computed_tokens} is outside 0..{state.num_tokens}"
            )
        end = max(0, num_computed_tokens - self.sliding_window) // self.block_size
        released = state.block_ids[state.num_released : end]
        if not released:
            return 0
        state.block_ids[state.num_released : end] = [NULL_BLOCK] * len(released)
        state.num_released = end
        self.pool.free(reversed(released))
        return len(released)

    def free(self, request_id: str) -> None:
        """Give back every block of the request, tail first, and forget its table."""
        state = self._requests.pop(request_id, None)
        if state is None:
            if request_id in self._freed_ids:
                raise DoubleFreeError(f"request {request_id!r} was already freed")
            raise UnknownRequestError(request_id)
        table = state.block_ids
        self.pool.free(reversed(table[state.num_released :]))
        self._freed_ids[request_id] = None
        if len(self._freed_ids) > _FREED_IDS_REMEMBERED:
            del self._freed_ids[next(iter(self._freed_ids))]

    def _state(self, request_id: str) -> _RequestState:
        state = self._requests.get(request_id)
        if state is None:
            raise UnknownRequestError(request_id)
        return state
