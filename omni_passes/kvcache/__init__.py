"""KV-side support for OmniAttn (sink + recent attention).

- ``attention``: transformers attention functions: the masked reference (dense attention with
  the sink+recent mask on the pattern layers) and the mask adapter a compressed cache needs.
- ``compressed``: ``CompressedStaticCache``, a static cache whose pattern layers keep only
  sink + recent slots (ring buffer), for graph-mode decode with constant KV memory there.
- ``vllm_mla``: ``omni_vllm::sparse_mla_attention``, vLLM's MLA attention restricted to the
  sink + recent keys (what the pass inserts into vLLM graphs).

Submodules import transformers / vLLM lazily; ``import omni_passes.kvcache`` needs torch only.
"""
