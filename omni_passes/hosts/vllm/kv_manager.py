"""``SinkRecentManager``: vLLM's per-group KV manager for ``SinkRecentMLASpec`` layers.

vLLM's scheduler owns one ``SingleTypeKVCacheManager`` per KV cache group, all drawing from one
``BlockPool``. Each step of a request it calls, in this order (``KVCacheManager.allocate_slots``):

1. ``remove_skipped_blocks(req, processed)``: this manager returns to the pool every block that
   lies entirely in [sink, processed + 1 − recent) and puts the null block in its table slot
   (a per-request cursor makes this O(blocks freed));
2. ``get_num_blocks_to_allocate`` / ``allocate_new_blocks(req, N)``: blocks for the new tokens.
   Only blocks that hold a sink position or a position ≥ N − recent get storage; the others
   (a long prompt's middle, written by the prefill and never read from the cache) are the null
   block from the start. The layer masks its cache writes into the null block
   (``omni_passes.hosts.vllm.kv_layer``), so block 0 is never written or read by these layers.

The block table keeps one entry per block position (position p is in entry p // block_size),
so the attention op finds the sink and recent rows where vLLM's other managers would put them.
Block arithmetic lives in ``omni_passes.kvcache.window``; this class applies it to vLLM's
bookkeeping. Per request at most ``sink/bs + recent/bs + 1`` blocks are live.

Prefix caching is not supported (the plugin refuses it at start-up, and vLLM turns it off for
MLA on CPU anyway): a cache hit would need the sink and the window blocks of the hit prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

from omni_passes.hosts.vllm.kv_spec import SinkRecentMLASpec


class SinkRecentManager(SingleTypeKVCacheManager):
    def __init__(self, kv_cache_spec: SinkRecentMLASpec, **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        if self.dcp_world_size != 1 or self.pcp_world_size != 1:
            raise ValueError("sink+recent KV groups do not support decode/prefill context parallelism")
        self.window = kv_cache_spec.window
        # Per request: every table entry in [sink blocks, cursor) is already null. Freed and
        # never-stored entries interleave under chunked prefill (a chunk longer than the window
        # leaves a null gap above stored context blocks), so freeing cannot stop at the first
        # null entry as vLLM's sliding-window manager does.
        self._freed_to: dict[str, int] = {}

    # -- allocation ----------------------------------------------------------------------------
    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks: Sequence[Any],
                                   total_computed_tokens: int, num_local_computed_tokens: int,
                                   num_tokens_main_model: int, apply_admission_cap: bool = False,
                                   prefill_end: int = 0) -> int:
        if len(new_computed_blocks) > 0:
            raise NotImplementedError("sink+recent KV groups cannot take prefix-cache hits")
        held = len(self.req_to_blocks.get(request_id, ()))
        return sum(self.window.new_blocks(held, num_tokens))

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list[Any]:
        req_blocks = self.req_to_blocks[request_id]
        plan = self.window.new_blocks(len(req_blocks), num_tokens)
        if not plan:
            return []
        fresh = iter(self.block_pool.get_new_blocks(sum(plan)))
        new_blocks = [next(fresh) if stored else self._null_block for stored in plan]
        req_blocks.extend(new_blocks)
        if self._record_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in new_blocks if not b.is_null)
        return new_blocks

    # -- freeing -------------------------------------------------------------------------------
    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        freeable = self.window.freeable_blocks(processed_computed_tokens)
        start = max(freeable.start, self._freed_to.get(request_id, 0))
        stop = min(freeable.stop, len(blocks))
        if start >= stop:
            return
        freed = []
        for i in range(start, stop):
            if not blocks[i].is_null:
                freed.append(blocks[i])
                blocks[i] = self._null_block
        self._freed_to[request_id] = stop
        if freed:
            self.block_pool.free_blocks(reversed(freed))

    def pop_blocks_for_free(self, request_id: str) -> list[Any]:
        self._freed_to.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def live_blocks(self, request_id: str) -> int:
        """Blocks with storage that ``request_id`` holds now (what the tests bound)."""
        return sum(not b.is_null for b in self.req_to_blocks.get(request_id, ()))

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0  # no cascade attention over a shared prefix: the window's blocks are per request

    # -- prefix caching (refused) --------------------------------------------------------------
    @classmethod
    def find_longest_cache_hit(cls, *args: Any, **kwargs: Any):
        raise NotImplementedError("prefix caching with sink+recent KV groups is not supported")
