"""Typed errors: misuse of the cache is reported, never absorbed into a corrupted pool."""


class KVCacheError(Exception):
    """Base class of every error raised by kvpage_cache."""


class InvalidArgumentError(KVCacheError, ValueError):
    """An argument is out of range (a negative count, a length past the request's end, ...)."""


class UnknownRequestError(KVCacheError, LookupError):
    """The request id has no block table in this manager."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"unknown request id {request_id!r}: it has no block table")
        self.request_id = request_id


class DuplicateRequestError(KVCacheError):
    """The request id already has a block table (e.g. the child id of a fork)."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request id {request_id!r} already has a block table")
        self.request_id = request_id


class DoubleFreeError(KVCacheError):
    """A request or a block was freed twice."""


class RequestTooLargeError(KVCacheError):
    """A request needs more blocks than the whole pool holds: it can never fit."""

    def __init__(self, num_blocks_needed: int, num_blocks: int, block_size: int) -> None:
        super().__init__(
            f"request needs {num_blocks_needed} blocks of {block_size} tokens "
            f"but the whole pool has {num_blocks}"
        )
        self.num_blocks_needed = num_blocks_needed
        self.num_blocks = num_blocks


class NoFreeBlocksError(KVCacheError):
    """The pool was asked for more blocks than are free (the manager checks before asking)."""


class StaleHitError(KVCacheError):
    """Computed blocks passed to allocate_slots are no longer cached (evicted since the lookup)."""
