"""Prefix-cache block hashes as vLLM computes them for its KV events.

vLLM (v1, ``prefix_caching_hash_algo`` = ``sha256``, the default) hashes every *full* block of
``block_size`` prompt tokens as a chain::

    h_0 = H((NONE_HASH, tuple(tokens[0:B]), None))
    h_i = H((h_{i-1}, tuple(tokens[i*B:(i+1)*B]), None))

where ``H(x) = sha256(pickle.dumps(x, protocol=5))`` and ``NONE_HASH = H(seed)`` with seed
``"vllm-none-hash"`` (or ``$PYTHONHASHSEED`` when the engine has it set). ``sha256_cbor`` uses
canonical CBOR instead of pickle. ``None`` is the per-block "extra keys" (LoRA, multimodal,
cache salt), absent for plain text requests.

Events carry the 32-byte digests (or, with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``, their low
64 bits as an int). Indexes here key blocks by :func:`to_key`, the same low-64-bit integer,
so both forms land on the same key.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from typing import Callable

DEFAULT_SEED = "vllm-none-hash"
HASH_ALGOS = ("sha256", "sha256_cbor")
_MASK64 = (1 << 64) - 1


def _sha256_pickle(value: object) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(value: object) -> bytes:
    import cbor2  # lazy: only needed for engines started with sha256_cbor

    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


def hash_function(algo: str) -> Callable[[object], bytes]:
    """The digest function vLLM uses for ``--prefix-caching-hash-algo ALGO``."""
    if algo == "sha256":
        return _sha256_pickle
    if algo == "sha256_cbor":
        return _sha256_cbor
    raise ValueError(f"unknown block hash algorithm {algo!r}; choose one of {', '.join(HASH_ALGOS)}")


def to_key(block_hash: bytes | int) -> int:
    """Index key of a block hash: low 64 bits, big-endian (vLLM's int form of the digest)."""
    if isinstance(block_hash, int):
        return block_hash & _MASK64
    return int.from_bytes(block_hash, "big") & _MASK64


class BlockHasher:
    """Chain hashes of full token blocks, identical to vLLM's prefix-cache hashes."""

    def __init__(self, block_size: int = 16, algo: str = "sha256", seed: str = DEFAULT_SEED):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.algo = algo
        self._hash = hash_function(algo)
        self.none_hash = self._hash(seed)

    def digests(self, token_ids: Sequence[int]) -> list[bytes]:
        """Digests of the ``len(token_ids) // block_size`` full blocks, in order."""
        size = self.block_size
        parent = self.none_hash
        out: list[bytes] = []
        for start in range(0, len(token_ids) - size + 1, size):
            parent = self._hash((parent, tuple(token_ids[start : start + size]), None))
            out.append(parent)
        return out

    def keys(self, token_ids: Sequence[int]) -> list[int]:
        """Index keys (:func:`to_key`) of the full blocks of ``token_ids``."""
        return [to_key(d) for d in self.digests(token_ids)]
