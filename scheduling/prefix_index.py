"""Which instance holds which prompt blocks in its prefix cache.

Keys are block-hash keys (``scheduling.block_hash.to_key``): a chain hash, so a key stands for
the whole prefix up to and including its block. Two sources fill the index:

* **approximate inserts** at routing time: when a request is sent to an instance we assume its
  prompt blocks will be cached there. On instances that publish KV events these entries expire
  after ``approx_ttl_s`` unless an event confirms them (the request may fail, or the engine may
  not cache them); on instances without events they live until LRU eviction.
* **KV events** (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``): confirmed entries,
  removed only by events, LRU capacity or instance removal.

Each instance keeps at most ``capacity_blocks`` entries (least recently touched go first), so a
proxy without events cannot grow without bound.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

CONFIRMED = math.inf  # expiry of an entry confirmed by a KV event


class PrefixIndex:
    def __init__(self, capacity_blocks: int = 1 << 18, approx_ttl_s: float = 30.0):
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self.approx_ttl_s = approx_ttl_s
        self._holders: dict[int, set[str]] = {}
        # per instance: key -> expiry time (CONFIRMED for event-backed entries), in LRU order
        self._entries: dict[str, OrderedDict[int, float]] = {}
        self._has_events: dict[str, bool] = {}
        self._expiries: deque[tuple[float, str, int]] = deque()

    # -- instances ---------------------------------------------------------------------------
    def add_instance(self, instance: str, *, events: bool = False) -> None:
        self._entries.setdefault(instance, OrderedDict())
        self._has_events[instance] = events or self._has_events.get(instance, False)

    def set_events(self, instance: str, events: bool) -> None:
        self.add_instance(instance)
        self._has_events[instance] = events

    def remove_instance(self, instance: str) -> None:
        self.cleared(instance)
        self._entries.pop(instance, None)
        self._has_events.pop(instance, None)

    def instances(self) -> list[str]:
        return list(self._entries)

    def size(self, instance: str) -> int:
        return len(self._entries.get(instance, ()))

    def contains(self, instance: str, key: int) -> bool:
        return key in self._entries.get(instance, ())

    # -- queries -----------------------------------------------------------------------------
    def match(self, keys: Sequence[int], instances: Iterable[str] | None = None) -> dict[str, int]:
        """Number of leading blocks of ``keys`` each instance holds.

        keys: block keys of one prompt, in order. Returns ``{instance: matched_blocks}`` for
        every instance asked about (all known instances by default), 0 where nothing matches.
        Cost: O(matched depth x instances still matching).
        """
        wanted = list(self._entries) if instances is None else list(instances)
        depth = dict.fromkeys(wanted, 0)
        alive = {i for i in wanted if i in self._entries}
        for position, key in enumerate(keys):
            holders = self._holders.get(key)
            if not holders:
                break
            alive &= holders
            if not alive:
                break
            for instance in alive:
                depth[instance] = position + 1
        return depth

    # -- updates -----------------------------------------------------------------------------
    def insert_approx(self, instance: str, keys: Sequence[int], now: float) -> None:
        """Routing-time guess: ``instance`` will hold these blocks (never downgrades confirmed)."""
        self.add_instance(instance)
        entries = self._entries[instance]
        expires = now + self.approx_ttl_s if self._has_events[instance] else CONFIRMED
        for key in keys:
            old = entries.get(key)
            if old is None:
                self._add(instance, entries, key, expires)
                if expires != CONFIRMED:
                    self._expiries.append((expires, instance, key))
            else:
                entries.move_to_end(key)
                if old != CONFIRMED and expires > old:
                    entries[key] = expires
                    self._expiries.append((expires, instance, key))
        self._trim(instance, entries)

    def stored(self, instance: str, keys: Iterable[int]) -> None:
        """KV event ``BlockStored``: confirmed entries."""
        self.add_instance(instance)
        entries = self._entries[instance]
        for key in keys:
            if key in entries:
                entries[key] = CONFIRMED
                entries.move_to_end(key)
            else:
                self._add(instance, entries, key, CONFIRMED)
        self._trim(instance, entries)

    def removed(self, instance: str, keys: Iterable[int]) -> None:
        """KV event ``BlockRemoved``."""
        entries = self._entries.get(instance)
        if entries is None:
            return
        for key in keys:
            if entries.pop(key, None) is not None:
                self._drop_holder(instance, key)

    def cleared(self, instance: str) -> None:
        """KV event ``AllBlocksCleared`` (also: instance restarted or removed)."""
        entries = self._entries.get(instance)
        if entries is None:
            return
        for key in entries:
            self._drop_holder(instance, key)
        entries.clear()

    def expire(self, now: float) -> int:
        """Drop approximate entries whose time is up; returns how many went."""
        dropped = 0
        queue = self._expiries
        while queue and queue[0][0] <= now:
            expires, instance, key = queue.popleft()
            entries = self._entries.get(instance)
            if entries is not None and entries.get(key) == expires:
                del entries[key]
                self._drop_holder(instance, key)
                dropped += 1
        return dropped

    # -- internals ---------------------------------------------------------------------------
    def _add(self, instance: str, entries: OrderedDict[int, float], key: int, expires: float) -> None:
        entries[key] = expires
        holders = self._holders.get(key)
        if holders is None:
            self._holders[key] = {instance}
        else:
            holders.add(instance)

    def _drop_holder(self, instance: str, key: int) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(instance)
            if not holders:
                del self._holders[key]

    def _trim(self, instance: str, entries: OrderedDict[int, float]) -> None:
        while len(entries) > self.capacity_blocks:
            key, _ = entries.popitem(last=False)
            self._drop_holder(instance, key)
