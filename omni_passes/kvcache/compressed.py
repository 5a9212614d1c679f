"""A static KV cache whose compressed layers keep only sink + recent slots.

``CompressedStaticCache(config, max_cache_len, sink, recent, pattern)`` is a transformers
``Cache`` for graph-mode decode: layers in ``pattern`` are ``SinkRecentLayer`` (``sink + recent``
slots, constant in the context length), the others ordinary ``StaticLayer`` (``max_cache_len``
slots). Every tensor has a fixed shape and is updated in place, so a compiled decode step is one
graph that never recompiles.

Slot layout of a compressed layer (W = sink + recent slots)::

    slot:      0 .. sink-1 | sink .. W-1
    holds:     positions   | ring: position p lives in slot sink + (p - sink) % recent
               0 .. sink-1 |       (the last `recent` positions, overwritten in turn)

Why the attention op sees the right keys without being told key positions: attention is a sum
over keys and RoPE is applied before caching, so key order does not matter, only the set. After
writing position p the layer holds exactly the visible set {0..sink-1} ∪ (p - recent, p]
(all of it once p >= W - 1; slots 0..p before). The model's causal mask, cut to the W slots
(``omni_passes.kvcache.attention.use_sliced_masks``), allows slots [0, min(p, W - 1)], i.e.
exactly the filled ones, and the sparse-attention pass derives q_pos = min(p, W - 1) from it:
with that position ``omni::sparse_attention``'s contract ("key index j holds position j")
selects every filled slot. Without the pass the sliced mask gives the same set, so decode over
this cache is sink+recent attention either way.

Prefill (several tokens at once) must start on an empty cache: the layer stores the sink and the
last ``recent`` prompt positions and returns the prompt's own keys for this step (index j =
position j), so a compiled prefill with the pass computes sink+recent attention over the prompt.
Chunked prefill into a compressed layer is not supported (checked in eager mode).

DeepSeek-V3 in transformers caches the compressed latents (``kv_a`` output and the roped key
part), so a compressed layer also expands (``kv_b_proj``) only W rows per step.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer
from transformers.utils.import_utils import is_torchdynamo_compiling


def ring_slot(position: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Slot of an absolute position in a compressed layer (see the module docstring)."""
    return torch.where(position < sink, position, sink + torch.remainder(position - sink, recent))


class SinkRecentLayer(StaticLayer):
    """``sink + recent`` slots; see the module docstring for the layout."""

    def __init__(self, max_cache_len: int, sink: int, recent: int):
        super().__init__(max_cache_len=max_cache_len)
        self.sink, self.recent = sink, recent
        self.slots = sink + recent

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        full = self.max_cache_len
        self.max_cache_len = self.slots  # StaticLayer allocates max_cache_len rows
        try:
            super().lazy_initialization(key_states, value_states)
        finally:
            self.max_cache_len = full  # the mask still spans the full context

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        if count == 1:  # decode: one position, into its slot
            slot = ring_slot(self.cumulative_length, self.sink, self.recent).reshape(1)
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            self.cumulative_length.add_(1)
            return self.keys, self.values
        if not is_torchdynamo_compiling() and int(self.cumulative_length) != 0:
            raise RuntimeError(
                f"compressed KV layer: a {count}-token step after {int(self.cumulative_length)} cached tokens; "
                "chunked prefill into a sink+recent layer is not supported (prefill in one step)")
        kept = [i for i in range(count) if i < self.sink or i >= max(self.sink, count - self.recent)]
        slots = [i if i < self.sink else self.sink + (i - self.sink) % self.recent for i in kept]
        src = torch.tensor(kept, device=key_states.device)
        dst = torch.tensor(slots, device=key_states.device)
        self.keys.index_copy_(2, dst, key_states.index_select(2, src))
        self.values.index_copy_(2, dst, value_states.index_select(2, src))
        self.cumulative_length.add_(count)
        return key_states, value_states


class CompressedStaticCache(Cache):
    """Static cache with ``SinkRecentLayer`` on the pattern layers (see the module docstring).

    Use with ``omni_passes.kvcache.attention.use_sliced_masks(model)``."""

    def __init__(self, config, max_cache_len: int, sink: int, recent: int, pattern):
        if not isinstance(sink, int) or not isinstance(recent, int) or sink < 0 or recent < 1:
            raise ValueError(f"CompressedStaticCache: need sink >= 0 and recent >= 1, got sink={sink!r}, recent={recent!r}")
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
        bad = [i for i in pattern if not (isinstance(i, int) and 0 <= i < num_layers)]
        if bad:
            raise ValueError(f"CompressedStaticCache: pattern names layer(s) {bad}; the model has {num_layers} layers")
        # Compress only where it saves slots; a shorter cache stays dense (same attention).
        compress = max_cache_len > sink + recent
        layers = [SinkRecentLayer(max_cache_len, sink, recent) if compress and i in pattern
                  else StaticLayer(max_cache_len) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.full_length = max_cache_len
        self.sink, self.recent, self.pattern = sink, recent, sorted(pattern)

    def memory_report(self) -> dict:
        """Bytes held per layer vs a full static cache of ``max_cache_len`` (after the first
        forward: layers allocate lazily)."""
        layers = []
        held = full = 0
        for i, layer in enumerate(self.layers):
            if not layer.is_initialized:
                raise RuntimeError("memory_report: the cache is not allocated yet (run a forward first)")
            nbytes = layer.keys.nbytes + layer.values.nbytes
            would = nbytes // layer.keys.shape[2] * self.full_length
            layers.append({"layer": i, "slots": int(layer.keys.shape[2]), "bytes": int(nbytes),
                           "full_bytes": int(would), "compressed": isinstance(layer, SinkRecentLayer)})
            held += nbytes
            full += would
        return {"max_cache_len": self.full_length, "sink": self.sink, "recent": self.recent,
                "pattern": self.pattern, "bytes": int(held), "full_bytes": int(full),
                "saved_bytes": int(full - held), "saved_fraction": (full - held) / full if full else 0.0,
                "layers": layers}
