"""Expert parallelism for DeepSeek MoE layers over torch.distributed, placement-aware.

- ``omni_passes.ep.moe.ExpertParallelMoE``: one rank's slots, dispatch tables and compiled
  regions for a stack of MoE layers; tokens go to the rank of their slot and back by
  all-to-all; ``apply(placement)`` switches placement in place.
- ``omni_passes.ep.rebalance.DistributedRebalancer``: the online rebalancer across ranks.
- ``omni_passes.ep.launch.run_workers``: spawn one process per rank (gloo on CPU, NCCL on GPUs).
- ``omni_passes.ep.weights``: MoE sizes, logical weights, where slot weights come from.

Nothing here imports transformers or vLLM; ``MoELayerWeights.from_hf_moe`` reads a loaded
transformers module that the caller built.
"""
