"""Chained block hashes.

A full block's hash covers its parent block's hash, its token ids and the request's extra
keys, so equal hashes mean an equal prefix from the first token on. The bytes fed to the hash
are unambiguous: the parent hash is length-prefixed (empty for the first block), the token ids
are fixed-width little-endian int64 (a block always holds ``block_size`` of them) and the extra
keys come last, each one tagged with its kind and its value's type and length.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import NewType

from .errors import InvalidArgumentError

BlockHash = NewType("BlockHash", bytes)
HashFn = Callable[[bytes], bytes]
ExtraKeys = Sequence[tuple[str, object]]

LORA = "lora"  # extra-key kind: LoRA adapter id
CACHE_SALT = "salt"  # extra-key kind: tenant cache salt

_VALUE_TAGS = {str: b"s", int: b"i", bytes: b"b"}


def sha256(data: bytes) -> bytes:
    """The default hash function."""
    return hashlib.sha256(data).digest()


def encode_extra_keys(extra_keys: ExtraKeys) -> bytes:
    """Encode (kind, value) pairs so that no two different key sets give the same bytes.

    The kind is part of the encoding, so ``("lora", "x")`` and ``("salt", "x")`` differ; the
    pairs are sorted, so their order does not matter. Values are str, int or bytes.
    """
    if not extra_keys:
        return b""
    return b"".join(sorted(_encode_pair(kind, value) for kind, value in extra_keys))


def _encode_pair(kind: str, value: object) -> bytes:
    tag = _VALUE_TAGS.get(type(value))
    if not isinstance(kind, str) or not kind or tag is None:
        raise InvalidArgumentError(
            f"extra key must be (non-empty str kind, str | int | bytes value), got {(kind, value)!r}"
        )
    kind_bytes = kind.encode()
    payload = value if isinstance(value, bytes) else str(value).encode()
    return _with_length(kind_bytes) + tag + _with_length(payload)


def _with_length(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


class BlockHasher:
    """Hashes full blocks of one block size with an injectable hash function."""

    def __init__(self, block_size: int, hash_fn: HashFn | None = None) -> None:
        self.block_size = block_size
        self._pack = struct.Struct(f"<{block_size}q").pack
        self._hash_fn = hash_fn or sha256

    def token_key(self, token_ids: Sequence[int]) -> bytes:
        """Fixed-width encoding of one block's token ids: what a cached block stores and compares."""
        try:
            return self._pack(*token_ids)
        except struct.error as error:
            raise InvalidArgumentError(f"token ids must be 64-bit integers: {error}") from None

    def hash_block(self, parent: bytes, token_key: bytes, extra: bytes) -> BlockHash:
        """Hash of a block whose parent hash is ``parent`` (b"" for the first block)."""
        return BlockHash(
            self._hash_fn(len(parent).to_bytes(2, "little") + parent + token_key + extra)
        )
