"""What the scheduler needs from a KV cache manager (kvpage_cache.KVCacheManager fits)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol


class PrefixHitLike(Protocol):
    """Blocks already holding a prompt prefix (not yet referenced), the tokens they cover, and
    the hash of the uncached full block that follows (None when there is none to look up)."""

    block_ids: list[int]
    num_tokens: int
    next_block_hash: Hashable | None


class CacheStatsLike(Protocol):
    @property
    def hit_rate(self) -> float: ...


class CacheManagerProtocol(Protocol):
    """The cache calls the scheduler makes, and nothing more."""

    @property
    def block_size(self) -> int: ...

    @property
    def stats(self) -> CacheStatsLike: ...

    @property
    def sliding_window(self) -> int | None:
        """Tokens a query attends back over, or None (all): with a window, the scheduler
        releases each request's blocks that fall out of it."""
        ...

    def lookup_prefix(self, request_id: str, token_ids: Sequence[int],
                      extra_keys: tuple = ()) -> PrefixHitLike: ...

    def allocate_slots(self, request_id: str, num_new_tokens: int,
                       computed_blocks: Sequence[int] = (),
                       num_lookahead_tokens: int = 0) -> list[int] | None: ...

    def take_block_copies(self) -> list[tuple[int, int]]: ...

    def commit_full_blocks(self, request_id: str, token_ids: Sequence[int],
                           extra_keys: tuple = ()) -> None: ...

    def free(self, request_id: str) -> None: ...

    def fork(self, parent_id: str, child_id: str) -> list[tuple[int, int]]: ...

    def truncate(self, request_id: str, num_tokens: int) -> None: ...

    def free_outside_window(self, request_id: str, num_computed_tokens: int) -> int: ...

    def block_ids(self, request_id: str) -> list[int]: ...

    def block_table(self, request_id: str) -> Sequence[int]:
        """The live block table, without a copy (read only)."""
        ...

    def can_ever_fit(self, num_tokens: int) -> bool: ...

    def usage(self) -> float: ...
