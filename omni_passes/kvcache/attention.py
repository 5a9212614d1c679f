"""transformers attention functions for sink + recent attention (registered by name).

``masked_reference(model, sink, recent, pattern)`` (context manager): the model computes dense
attention with the sink+recent causal mask ANDed into its own mask on the pattern layers, every
other layer unchanged. It is *the* reference the pass is checked against (whole-model tests,
``omni-passes inspect --check``) and what the pattern search evaluates (no compile needed).
Query positions come from the ``position_ids`` the decoder layers pass to attention (key index
j holds position j: a dense cache or no cache, no left padding), independently of how the pass
derives them from the mask.

``use_sliced_masks(model)``: attention in every layer sees the model's mask cut to its own key
length. A ``CompressedStaticCache`` returns only ``sink + recent`` slots for its compressed
layers while the model builds one mask as long as the full cache; cut to the slots, a decode row
allows slots [0, min(p, slots - 1)]: all filled slots, which hold exactly the sink and the last
``recent`` positions.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

REFERENCE = "omni_sink_recent_reference"
SLICED = "omni_sliced_sdpa"
WINDOW_ATTR = "_omni_sink_recent"
_registered = False


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    window = getattr(module, WINDOW_ATTR, None)
    if window is not None:
        attention_mask = apply_window(attention_mask, query, key, kwargs.get("position_ids"), *window)
    return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def apply_window(attention_mask, query: torch.Tensor, key: torch.Tensor, position_ids, sink: int, recent: int):
    """The model's mask AND the sink+recent causal mask. query [B, H, Sq, D], key [B, H, Sk, D];
    position_ids [1 or B, Sq] (default: the last Sq of Sk positions) -> bool [B, 1, Sq, Sk]."""
    from kernels.sparse_attention import sparse_attention_mask

    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    if position_ids is None or position_ids.shape[-1] != q_len:
        position_ids = torch.arange(k_len - q_len, k_len, device=query.device)[None]
    positions = position_ids.to(query.device).expand(batch, q_len)
    window = sparse_attention_mask(positions, k_len, sink, recent)[:, None]
    if attention_mask is None:
        return window
    attention_mask = attention_mask[..., :k_len]
    if attention_mask.dtype == torch.bool:
        return attention_mask & window
    return attention_mask.masked_fill(~window, float("-inf"))


def _sliced_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
        attention_mask = attention_mask[..., : key.shape[2]]
    return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> None:
    """Register both functions with transformers' AttentionInterface (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(REFERENCE, _reference_attention)
    AttentionInterface.register(SLICED, _sliced_attention)
    # Same masks as SDPA: an attention name without a mask function gets no mask at all
    # (transformers then relies on is_causal, which is wrong for decode over a static cache).
    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    AttentionMaskInterface.register(REFERENCE, sdpa_mask)
    AttentionMaskInterface.register(SLICED, sdpa_mask)
    _registered = True


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder-layer index -> its attention module (anything with a ``layer_idx``)."""
    found = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and hasattr(module, "config") and module.__class__.__name__.endswith("Attention"):
            found[idx] = module
    return found


@contextlib.contextmanager
def masked_reference(model: torch.nn.Module, sink: int, recent: int, pattern) -> Iterator[torch.nn.Module]:
    """Within the block ``model`` runs dense attention with the sink+recent mask on ``pattern``."""
    register()
    modules = attention_modules(model)
    missing = [i for i in pattern if i not in modules]
    if missing:
        raise ValueError(f"sparse_attention pattern names layer(s) {missing}; the model has layers 0..{len(modules) - 1}")
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = REFERENCE
    for i in pattern:
        setattr(modules[i], WINDOW_ATTR, (int(sink), int(recent)))
    try:
        yield model
    finally:
        for i in pattern:
            if hasattr(modules[i], WINDOW_ATTR):
                delattr(modules[i], WINDOW_ATTR)
        config._attn_implementation = previous


def use_sliced_masks(model: torch.nn.Module) -> None:
    """Switch the model to SDPA with masks cut to each layer's key length (permanent)."""
    register()
    model.config._attn_implementation = SLICED
