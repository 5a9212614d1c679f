"""The layer side of sink+recent KV in vLLM: what a compressed MLA layer changes at build time.

vLLM's DeepSeek model builds each decoder layer's attention as ``MultiHeadLatentAttentionWrapper``,
a ``PluggableLayer`` that an out-of-tree class can replace (``PluggableLayer.register_oot``).
``SinkRecentMLAWrapper`` is that class: it builds the layer exactly as vLLM does and then, for
layers in the pattern, changes its ``MLAAttention`` (the module that owns the KV cache) before
the worker asks for KV cache specs.

On CPU (``compress_layer``; attention is an op in the compiled graph, which the sparse-attention
pass rewrites; only with ``free_kv``):

* ``get_kv_cache_spec`` returns ``SinkRecentMLASpec`` (same page layout as the layer's own
  ``MLAAttentionSpec``, plus the window), so the layer lands in its own KV cache group served by
  ``SinkRecentManager``;
* ``update_kv_cache`` drops writes aimed at the null block (slots < block_size): the tokens of
  a long prompt's middle have no storage, since nothing will read them from the cache;
* ``forward_impl`` refuses to run vLLM's dense MLA over sequences longer than sink + recent
  (some of their blocks are freed): only ``omni_vllm::sparse_mla_attention`` — what the
  sparse-attention pass puts in the graph — may, and it calls ``dense_forward_impl``.

On CUDA (``kv_cuda.compress_layer_cuda``; attention is a splitting op no graph pass sees, so the
layer's backend and impl change instead; also with ``free_kv: false``, then over dense KV).

Start-up refuses (naming the setting) what this cannot serve correctly (``kv_checks``:
``startup_problem`` on CPU, ``cuda_startup_problem`` on CUDA). Layers outside the pattern are
untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper

from omni_passes.config import SparseAttentionConfig
from omni_passes.hosts.vllm.kv_checks import (
    SinkRecentKVError,
    cuda_startup_problem,
    startup_problem,
)
from omni_passes.layer_names import decoder_layer_index

log = logging.getLogger("omni_passes")

_window: SparseAttentionConfig | None = None  # set by ``install`` in every vLLM process


def install(config: SparseAttentionConfig) -> None:
    """Make vLLM build MLA layers through ``SinkRecentMLAWrapper`` with this window."""
    global _window
    from vllm.model_executor.custom_op import op_registry_oot

    _window = config
    name = MultiHeadLatentAttentionWrapper.__name__
    registered = op_registry_oot.get(name)
    if registered is None:
        MultiHeadLatentAttentionWrapper.register_oot(SinkRecentMLAWrapper, name=name)
    elif registered is not SinkRecentMLAWrapper:
        raise SinkRecentKVError(f"another plugin already replaced vLLM's {name} ({registered!r}); "
                                "sink+recent KV needs to build the MLA layers itself")


def uninstall() -> None:
    """Undo ``install`` in this process (tests that build vLLM models afterwards)."""
    global _window
    from vllm.model_executor.custom_op import op_registry_oot

    _window = None
    if op_registry_oot.get(MultiHeadLatentAttentionWrapper.__name__) is SinkRecentMLAWrapper:
        del op_registry_oot[MultiHeadLatentAttentionWrapper.__name__]


class SinkRecentMLAWrapper(MultiHeadLatentAttentionWrapper):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = _window
        index = decoder_layer_index(self.prefix)
        if config is None or index is None or index not in config.pattern:
            return
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        if _on_cuda():
            from omni_passes.hosts.vllm.kv_cuda import compress_layer_cuda, layer_facts

            problem = cuda_startup_problem(vllm_config, config, layer_facts(self.mla_attn, vllm_config))
            if problem:
                raise SinkRecentKVError(f"sink+recent attention (sparse_attention, free_kv={str(config.free_kv).lower()}) "
                                        f"for {self.prefix}: {problem}")
            compress_layer_cuda(self.mla_attn, config.sink, config.recent, config.free_kv)
            return
        problem = startup_problem(vllm_config, config)
        if problem:
            raise SinkRecentKVError(f"sink+recent KV (sparse_attention.free_kv) for {self.prefix}: {problem}")
        compress_layer(self.mla_attn, config.sink, config.recent, vllm_config.cache_config.block_size)


def _on_cuda() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def compress_layer(attn: Any, sink: int, recent: int, block_size: int) -> None:
    """Give one ``MLAAttention`` module the sink+recent spec, masked writes and the dense guard."""
    from omni_passes.hosts.vllm.kv_spec import SinkRecentMLASpec, plain_mla_spec

    mla_spec: Callable = attn.get_kv_cache_spec
    update: Callable = attn.update_kv_cache
    dense: Callable = attn.forward_impl
    name = attn.layer_name

    def get_kv_cache_spec(vllm_config: Any):
        return SinkRecentMLASpec.from_mla_spec(plain_mla_spec(mla_spec(vllm_config), name), sink, recent)

    def update_kv_cache(kv_c_normed, k_pe, kv_cache, slot_mapping, *args, **kwargs):
        if slot_mapping is not None:
            # Slots of the null block (block 0) belong to tokens without storage: skip them
            # (-1 is vLLM's padding slot, which every MLA cache writer skips).
            slot_mapping = torch.where(slot_mapping < block_size, torch.full_like(slot_mapping, -1), slot_mapping)
        return update(kv_c_normed, k_pe, kv_cache, slot_mapping, *args, **kwargs)

    def forward_impl(q, k_c_normed, k_pe, kv_cache, attn_metadata, *args, **kwargs):
        if attn_metadata is not None and attn_metadata.max_seq_len > sink + recent:
            raise RuntimeError(
                f"{name} keeps only sink+recent KV (blocks outside the window are freed), but vLLM's dense MLA "
                f"attention was called on a sequence of {attn_metadata.max_seq_len} tokens: the sparse-attention "
                "pass did not replace this layer's attention (check the omni pass report)")
        return dense(q, k_c_normed, k_pe, kv_cache, attn_metadata, *args, **kwargs)

    attn.get_kv_cache_spec = get_kv_cache_spec
    attn.update_kv_cache = update_kv_cache
    attn.forward_impl = forward_impl
    attn.dense_forward_impl = dense
    attn.omni_sink_recent = (sink, recent)
    log.info("omni sink+recent KV: %s keeps [0, %d) and the last %d positions", name, sink, recent)
