"""The simulated engine's KV blocks: a prefix cache with LRU eviction, and the events it makes.

Blocks are either *anonymous* (allocated to a request, content not cached: partial blocks,
generated tokens, or a full block whose hash another block already holds) or *cached* (keyed by
their chain hash). Cached blocks with no running request stay resident in LRU order until a
new allocation needs room; evicting one emits ``BlockRemoved``, caching one ``BlockStored``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from proxy.wire.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, Event


class BlockCache:
    def __init__(self, num_blocks: int, block_size: int):
        self.capacity = num_blocks
        self.block_size = block_size
        self.refs: dict[bytes, int] = {}               # cached blocks in use -> users
        self.free_cached: OrderedDict[bytes, None] = OrderedDict()  # cached, unused, LRU first
        self.anonymous = 0
        self.events: list[Event] = []
        self.generation = 0  # bumped by clear(): older holders' cached blocks became anonymous

    def free_blocks(self) -> int:
        return self.capacity - len(self.refs) - len(self.free_cached) - self.anonymous

    def match(self, digests: Sequence[bytes]) -> int:
        """Leading blocks of ``digests`` that are cached."""
        n = 0
        for d in digests:
            if d in self.refs or d in self.free_cached:
                n += 1
            else:
                break
        return n

    def acquire(self, hit: Sequence[bytes], new_blocks: int) -> bool:
        """Take the cached blocks ``hit`` and ``new_blocks`` fresh ones, evicting LRU if needed."""
        reusable_free = sum(1 for d in hit if d in self.free_cached)
        if new_blocks > self.free_blocks() + len(self.free_cached) - reusable_free:
            return False
        for d in hit:
            if d in self.free_cached:
                del self.free_cached[d]
                self.refs[d] = 1
            else:
                self.refs[d] += 1
        shortfall = new_blocks - self.free_blocks()
        if shortfall > 0:
            evicted = []
            for _ in range(shortfall):
                d, _ = self.free_cached.popitem(last=False)
                evicted.append(d)
            self.events.append(BlockRemoved(evicted, medium="GPU"))
        self.anonymous += new_blocks
        return True

    def commit(self, digests: Sequence[bytes], parent: bytes | None, token_ids: Sequence[int]) -> list[bytes]:
        """Anonymous full blocks just computed become cached under ``digests``.

        Returns the digests now held by the caller (a digest already cached elsewhere keeps the
        caller's block anonymous and is not returned).
        """
        stored: list[bytes] = []
        for d in digests:
            if d in self.refs or d in self.free_cached:
                continue
            self.anonymous -= 1
            self.refs[d] = 1
            stored.append(d)
        if stored:
            # one event per commit, as vLLM does per request; a run broken by already-cached
            # blocks is still reported with the request's tokens of the stored blocks only
            bs = self.block_size
            index = {d: k for k, d in enumerate(digests)}
            first = index[stored[0]]
            tokens = [t for d in stored for t in token_ids[index[d] * bs : (index[d] + 1) * bs]]
            parent_hash = digests[first - 1] if first > 0 else parent
            self.events.append(BlockStored(list(stored), parent_hash, tokens, bs, medium="GPU"))
        return stored

    def release(self, cached: Sequence[bytes], anonymous: int, generation: int) -> None:
        if generation != self.generation:
            self.anonymous -= len(cached) + anonymous
            return
        # tail blocks first, as vLLM frees them: eviction then takes a prompt's end before its
        # start, so shared prefixes survive longest
        for d in reversed(cached):
            users = self.refs[d] - 1
            if users:
                self.refs[d] = users
            else:
                del self.refs[d]
                self.free_cached[d] = None
        self.anonymous -= anonymous

    def clear(self) -> None:
        """Forget every cached block (blocks in use stay allocated, as anonymous)."""
        self.anonymous += sum(self.refs.values())
        self.generation += 1
        self.refs.clear()
        self.free_cached.clear()
        self.events.append(AllBlocksCleared())

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events
