import hashlib

import pytest
from kvpage_cache import CACHE_SALT, LORA, InvalidArgumentError, encode_extra_keys, sha256
from kvpage_cache.block_hash import BlockHasher


def test_default_hash_is_sha256():
    assert sha256(b"abc") == hashlib.sha256(b"abc").digest()


def test_hash_is_chained_on_the_parent():
    hasher = BlockHasher(block_size=2)
    key = hasher.token_key([1, 2])
    first = hasher.hash_block(b"", key, b"")
    assert hasher.hash_block(first, key, b"") != first
    assert hasher.hash_block(first, key, b"") == hasher.hash_block(first, key, b"")


def test_token_key_is_fixed_width_so_token_boundaries_are_unambiguous():
    hasher = BlockHasher(block_size=2)
    assert hasher.token_key([1, 23]) != hasher.token_key([12, 3])
    assert len(hasher.token_key([0, 2**40])) == 16


def test_extra_keys_change_the_hash():
    hasher = BlockHasher(block_size=2)
    key = hasher.token_key([1, 2])
    plain = hasher.hash_block(b"", key, b"")
    salted = hasher.hash_block(b"", key, encode_extra_keys([(CACHE_SALT, "t1")]))
    assert plain != salted


def test_a_lora_and_a_salt_with_the_same_value_never_share_bytes():
    assert encode_extra_keys([(LORA, "x")]) != encode_extra_keys([(CACHE_SALT, "x")])


def test_extra_key_values_are_typed_and_length_prefixed():
    assert encode_extra_keys([(LORA, "1")]) != encode_extra_keys([(LORA, 1)])
    assert encode_extra_keys([(LORA, b"1")]) != encode_extra_keys([(LORA, "1")])
    # concatenations that would collide without length prefixes
    assert encode_extra_keys([("ab", "c")]) != encode_extra_keys([("a", "bc")])
    assert encode_extra_keys([(LORA, "a"), (CACHE_SALT, "b")]) != encode_extra_keys(
        [(LORA, "a" + "\x00" * 4), (CACHE_SALT, "b")]
    )


def test_extra_key_order_does_not_matter():
    assert encode_extra_keys([(LORA, "a"), (CACHE_SALT, "t")]) == encode_extra_keys(
        ((CACHE_SALT, "t"), (LORA, "a"))
    )


def test_no_extra_keys_encode_to_nothing():
    assert encode_extra_keys(()) == b""


@pytest.mark.parametrize("pair", [("", "x"), (LORA, 1.5), (LORA, None), (LORA, True), (3, "x")])
def test_bad_extra_keys_raise(pair):
    with pytest.raises(InvalidArgumentError):
        encode_extra_keys([pair])


@pytest.mark.parametrize("token", [1.5, 2**63, "7"])
def test_token_ids_that_are_not_int64_raise(token):
    with pytest.raises(InvalidArgumentError, match="64-bit"):
        BlockHasher(block_size=2).token_key([1, token])
