"""Start-up checks of sink+recent attention under vLLM: what a configuration cannot serve correctly.

Each returns the first problem as one sentence naming the setting (and the nearest valid value
where there is one), or None; ``kv_layer`` raises ``SinkRecentKVError`` with it while vLLM builds
the first pattern layer, so the engine stops before it loads weights.

* ``startup_problem`` (CPU: the sparse-attention graph pass does the attention, the layer frees
  blocks): sink/recent not multiples of the block size, pattern layers the model does not have,
  compilation off or without the omni post-grad pass, prefix caching, speculative decoding, KV
  connectors, context parallelism.
* ``cuda_startup_problem`` (CUDA: the layer's impl does the attention, ``kv_cuda``): facts about
  the layer vLLM built (``CudaLayerFacts``: its backend and the block size it uses, the prefill
  backend, FA3) and the settings the impl cannot serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omni_passes.config import SparseAttentionConfig
from omni_passes.kvcache.window import block_multiple_problem

POST_GRAD_PASS = "omni_passes.vllm_post_grad_pass"


class SinkRecentKVError(ValueError):
    """A vLLM setup that sink+recent KV cannot serve correctly; the message names the setting."""


def startup_problem(vllm_config: Any, config: SparseAttentionConfig) -> str | None:
    """The first reason this vLLM configuration cannot free sink+recent KV blocks, or None."""
    from vllm.config import CompilationMode

    block_size = vllm_config.cache_config.block_size
    if problem := block_multiple_problem(config.sink, config.recent, block_size):
        return problem + "; or set free_kv to false to keep every block (no block-size constraint)"
    layers = vllm_config.model_config.hf_config.num_hidden_layers
    if missing := [i for i in config.pattern if i >= layers]:
        return f"pattern names layers {missing}, but the model has {layers} decoder layers (0..{layers - 1})"
    compilation = vllm_config.compilation_config
    if compilation.mode == CompilationMode.NONE:
        return ("compilation is off (enforce_eager or compilation mode 0), so the sparse-attention pass never "
                "replaces the attention of these layers; their freed blocks would be read")
    configured = compilation.inductor_passes.get("post_grad_custom_post_pass")
    if configured != POST_GRAD_PASS and type(configured).__name__ != "VllmPostGradPass":
        return (f"compilation_config.inductor_passes.post_grad_custom_post_pass is {configured!r}, not "
                f"{POST_GRAD_PASS!r}: without the pass these layers would read freed blocks")
    if vllm_config.cache_config.enable_prefix_caching:
        return "prefix caching is on; sink+recent groups cannot take prefix-cache hits (enable_prefix_caching=False)"
    if vllm_config.speculative_config is not None:
        return "speculative decoding is on; it is not supported with freed KV blocks"
    if vllm_config.kv_transfer_config is not None:
        return "a KV connector is configured; connectors expect every block of a request to exist"
    parallel = vllm_config.parallel_config
    if parallel.decode_context_parallel_size > 1 or getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        return "context parallelism is on; not supported with freed KV blocks"
    return None


@dataclass(frozen=True)
class CudaLayerFacts:
    """What vLLM chose for one MLA layer on CUDA (``kv_cuda.layer_facts`` reads them)."""

    backend: str                  # vLLM's MLA decode backend (FLASH_ATTN_MLA on an H100)
    block_size: int               # the KV block size vLLM will use with it
    prefill_backend: str | None   # vLLM's MLA prefill backend (FLASH_ATTN)
    fa_version: int | None        # its FlashAttention version (3 on Hopper)
    fa3_mla: bool                 # FA3 MLA kernels usable here (Hopper, SM 9.x)
    sparse: bool                  # a DeepSeek-V3.2 sparse (indexer) MLA layer


SUPPORTED_CUDA_DTYPES = ("bfloat16", "float16")
SUPPORTED_CUDA_CACHE_DTYPES = ("auto", "bfloat16", "float16")


def cuda_startup_problem(vllm_config: Any, config: SparseAttentionConfig, facts: CudaLayerFacts) -> str | None:
    """The first reason vLLM CUDA cannot run sink+recent attention on this layer, or None.

    Compressed layers decode with the paged sink+recent kernel on FLASH_ATTN_MLA's metadata and
    prefill with FA3 (``kv_cuda``); with ``free_kv`` their blocks outside the window are freed.
    """
    layers = vllm_config.model_config.hf_config.num_hidden_layers
    if missing := [i for i in config.pattern if i >= layers]:
        return f"pattern names layers {missing}, but the model has {layers} decoder layers (0..{layers - 1})"
    if config.free_kv and (problem := block_multiple_problem(config.sink, config.recent, facts.block_size)):
        return (f"{problem}, the KV block size vLLM uses with its {facts.backend} attention backend (cache_config."
                "block_size, --block-size); or set free_kv to false (no block-size constraint)")
    if facts.sparse:
        return "the layer is a sparse (indexer) MLA layer (DeepSeek-V3.2); sink+recent replaces dense MLA only"
    dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
    if dtype not in SUPPORTED_CUDA_DTYPES:
        return f"dtype is {dtype}; the FA3 MLA kernels on CUDA take {' or '.join(SUPPORTED_CUDA_DTYPES)} (dtype=...)"
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in SUPPORTED_CUDA_CACHE_DTYPES:
        return (f"kv_cache_dtype is {cache_dtype!r}; the sink+recent decode kernel reads a bf16/fp16 latent cache "
                "(kv_cache_dtype='auto')")
    if not facts.fa3_mla:
        return "FlashAttention 3 MLA is not available here (needs a Hopper GPU, SM 9.x, and vLLM's FA3 build)"
    if facts.prefill_backend != "FLASH_ATTN" or facts.fa_version != 3:
        return (f"the MLA prefill backend is {facts.prefill_backend} (FlashAttention {facts.fa_version}); sink+recent "
                "prefill needs FLASH_ATTN with FA3 (attention_config.mla_prefill_backend)")
    if config.free_kv and vllm_config.cache_config.enable_prefix_caching:
        return ("prefix caching is on (vLLM's default on CUDA); sink+recent groups cannot take prefix-cache hits: "
                "pass enable_prefix_caching=False (--no-enable-prefix-caching), or set free_kv to false")
    if config.free_kv and vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        return ("the hybrid KV cache manager is off (scheduler_config.disable_hybrid_kv_cache_manager); the "
                "compressed layers need their own KV cache group")
    if vllm_config.speculative_config is not None:
        return "speculative decoding is on; not supported with sink+recent attention"
    if config.free_kv and vllm_config.kv_transfer_config is not None:
        return "a KV connector is configured; connectors expect every block of a request to exist"
    parallel = vllm_config.parallel_config
    if parallel.decode_context_parallel_size > 1 or getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        return ("context parallelism is on (decode_context_parallel_size / prefill_context_parallel_size > 1); "
                "not supported with sink+recent attention")
    return None
