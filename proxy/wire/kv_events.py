"""vLLM KV cache events on the wire (vLLM 0.32, ``ZmqEventPublisher``).

A ZMQ PUB message has three frames: ``topic`` (bytes, "" by default), ``seq`` (8-byte
big-endian sequence number, one per batch) and ``payload``: msgpack of a ``KVEventBatch``,
an *array* ``[ts, events, data_parallel_rank]`` (the rank is left out when unset). Each event
is a *map* tagged by ``"type"``:

* ``{"type": "BlockStored", "block_hashes": [...], "parent_block_hash": h | None,
  "token_ids": [...], "block_size": B, "lora_id": ..., "medium": ..., "lora_name": ...,
  + optional extra_keys, group_idx, kv_cache_spec_kind, ...}``
* ``{"type": "BlockRemoved", "block_hashes": [...], "medium": ..., + optional group_idx, ...}``
* ``{"type": "AllBlocksCleared"}``

Block hashes are 32-byte sha256 digests, or ints with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``.
Older vLLM releases encoded events as arrays ``["BlockStored", hashes, parent, tokens,
block_size, lora_id, ...]``; the decoder accepts both.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

BlockHash = Union[bytes, int]


@dataclass
class BlockStored:
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None
    group_idx: int | None = None


@dataclass
class BlockRemoved:
    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


@dataclass
class AllBlocksCleared:
    pass


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]


@dataclass
class EventBatch:
    ts: float
    events: list[Event] = field(default_factory=list)
    data_parallel_rank: int | None = None


class KVEventDecodeError(ValueError):
    """A payload that is not a vLLM KV event batch."""


# -- encoding (the simulated engine publishes exactly what vLLM publishes) --------------------
def _event_to_wire(event: Event) -> dict[str, Any]:
    if isinstance(event, BlockStored):
        out: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": None,
            "medium": event.medium,
            "lora_name": None,
        }
        if event.group_idx is not None:
            out["group_idx"] = event.group_idx
        return out
    if isinstance(event, BlockRemoved):
        out = {"type": "BlockRemoved", "block_hashes": list(event.block_hashes), "medium": event.medium}
        if event.group_idx is not None:
            out["group_idx"] = event.group_idx
        return out
    if isinstance(event, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {type(event).__name__}")


def encode_batch(batch: EventBatch) -> bytes:
    array: list[Any] = [batch.ts, [_event_to_wire(e) for e in batch.events]]
    if batch.data_parallel_rank is not None:
        array.append(batch.data_parallel_rank)
    return msgpack.packb(array, use_bin_type=True)


def encode_seq(seq: int) -> bytes:
    return struct.pack(">q", seq)


def frames(topic: bytes, seq: int, batch: EventBatch) -> list[bytes]:
    """The three frames of one published batch."""
    return [topic, encode_seq(seq), encode_batch(batch)]


# -- decoding (the proxy's subscriber) ----------------------------------------------------------
def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise KVEventDecodeError(f"sequence frame has {len(frame)} bytes, expected 8")
    return struct.unpack(">q", frame)[0]


def _hashes(value: Any, what: str) -> list[BlockHash]:
    if not isinstance(value, list) or not all(isinstance(h, (bytes, int)) for h in value):
        raise KVEventDecodeError(f"{what}: block_hashes must be a list of bytes/int, got {value!r:.80}")
    return value


def _event_from_wire(raw: Any) -> Event | None:
    if isinstance(raw, dict):
        kind = raw.get("type")
        get = raw.get
    elif isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], str):
        kind = raw[0]
        names = {
            "BlockStored": ("type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"),
            "BlockRemoved": ("type", "block_hashes", "medium"),
            "AllBlocksCleared": ("type",),
        }.get(kind, ("type",))
        mapped = dict(zip(names, raw))
        get = mapped.get
    else:
        raise KVEventDecodeError(f"event is neither a tagged map nor a tagged array: {raw!r:.80}")
    if kind == "BlockStored":
        block_size = get("block_size")
        if not isinstance(block_size, int) or block_size <= 0:
            raise KVEventDecodeError(f"BlockStored: block_size must be a positive int, got {block_size!r}")
        return BlockStored(
            block_hashes=_hashes(get("block_hashes"), "BlockStored"),
            parent_block_hash=get("parent_block_hash"),
            token_ids=list(get("token_ids") or []),
            block_size=block_size,
            medium=get("medium"),
            group_idx=get("group_idx"),
        )
    if kind == "BlockRemoved":
        return BlockRemoved(_hashes(get("block_hashes"), "BlockRemoved"), get("medium"), get("group_idx"))
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    return None  # an event type this version does not know: skipped, not fatal


def decode_batch(payload: bytes) -> EventBatch:
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types
        raise KVEventDecodeError(f"payload is not msgpack: {exc}") from None
    if not isinstance(raw, (list, tuple)) or len(raw) < 2 or not isinstance(raw[1], (list, tuple)):
        raise KVEventDecodeError(f"payload is not a KVEventBatch array [ts, events, rank?]: {raw!r:.80}")
    ts = raw[0]
    rank = raw[2] if len(raw) > 2 else None
    events = [e for e in (_event_from_wire(r) for r in raw[1]) if e is not None]
    return EventBatch(ts=float(ts), events=events, data_parallel_rank=rank)
