"""kvpage-cache: paged KV-cache block management with prefix caching.

``BlockPool`` owns the blocks (ids, reference counts, LRU free queue, prefix-cache map);
``KVCacheManager`` keeps per-request block tables on top of it. Pure Python, no dependencies.
"""

from .block_hash import CACHE_SALT, LORA, BlockHash, encode_extra_keys, sha256
from .block_pool import BlockPool
from .errors import (
    DoubleFreeError,
    DuplicateRequestError,
    InvalidArgumentError,
    KVCacheError,
    NoFreeBlocksError,
    RequestTooLargeError,
    StaleHitError,
    UnknownRequestError,
)
from .kv_cache_manager import NULL_BLOCK, KVCacheManager, PrefixHit
from .stats import CacheStats

__version__ = "0.1.0"

__all__ = [
    "CACHE_SALT",
    "LORA",
    "NULL_BLOCK",
    "BlockHash",
    "BlockPool",
    "CacheStats",
    "DoubleFreeError",
    "DuplicateRequestError",
    "InvalidArgumentError",
    "KVCacheError",
    "KVCacheManager",
    "NoFreeBlocksError",
    "PrefixHit",
    "RequestTooLargeError",
    "StaleHitError",
    "UnknownRequestError",
    "encode_extra_keys",
    "sha256",
]
