import hashlib
import importlib.util
import pickle

import pytest

from scheduling.block_hash import BlockHasher, hash_function, to_key


def test_first_block_hash_is_vllm_chain_hash():
    # reference built by hand from the documented recipe (pickle protocol 5, sha256, seed)
    none_hash = hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=5)).digest()
    first = hashlib.sha256(pickle.dumps((none_hash, (1, 2, 3, 4), None), protocol=5)).digest()
    second = hashlib.sha256(pickle.dumps((first, (5, 6, 7, 8), None), protocol=5)).digest()
    hasher = BlockHasher(block_size=4)
    assert hasher.digests([1, 2, 3, 4, 5, 6, 7, 8, 9]) == [first, second]
    # value printed by vLLM 0.32's own hash_block_tokens(sha256, None, [1, 2, 3, 4])
    assert first.hex() == "52a7f141c60918f65779927090482b5a24adbe68c8613a211a1eb4e3edd9361a"


def test_partial_block_is_not_hashed_and_chain_depends_on_prefix():
    hasher = BlockHasher(block_size=4)
    assert hasher.digests([1, 2, 3]) == []
    a = hasher.keys([1, 2, 3, 4, 5, 6, 7, 8])
    b = hasher.keys([0, 2, 3, 4, 5, 6, 7, 8])
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same 2nd block, different parent


def test_key_of_bytes_equals_vllm_int_form():
    digest = bytes(range(32))
    assert to_key(digest) == int.from_bytes(digest, "big") & ((1 << 64) - 1)
    assert to_key(to_key(digest)) == to_key(digest)


def test_seed_changes_hashes():
    assert BlockHasher(4, seed="x").keys([1, 2, 3, 4]) != BlockHasher(4).keys([1, 2, 3, 4])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="block_size"):
        BlockHasher(0)
    with pytest.raises(ValueError, match="unknown block hash algorithm 'md5'"):
        hash_function("md5")


@pytest.mark.slow  # importing vllm takes ~10 s
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_matches_vllm_hash_block_tokens():
    from vllm.utils.hashing import sha256, sha256_cbor
    from vllm.v1.core import kv_cache_utils as kcu

    tokens = list(range(100, 164))
    for algo, fn in (("sha256", sha256), ("sha256_cbor", sha256_cbor)):
        kcu.init_none_hash(fn)
        parent = None
        expected = []
        for start in range(0, 64, 16):
            parent = kcu.hash_block_tokens(fn, parent, tokens[start : start + 16])
            expected.append(bytes(parent))
        assert BlockHasher(16, algo=algo).digests(tokens) == expected
