"""KV-side support for OmniAttn (sink + recent attention).

- ``attention``: transformers attention functions: the masked reference (dense attention with
  the sink+recent mask on the pattern layers) and the mask adapter a compressed cache needs.
- ``compressed``: ``CompressedStaticCache``, a static cache whose pattern layers keep only
  sink + recent slots (ring buffer), for graph-mode decode with constant KV memory there.
- ``window``: the sink+recent window's block arithmetic (which blocks a request keeps).

Everything vLLM-specific (the KV cache spec, its manager, the MLA layer hooks and the sparse MLA
op) is in the vLLM host, ``omni_passes.hosts.vllm``. Submodules import transformers lazily;
``import omni_passes.kvcache`` needs torch only.
"""
