"""The omni runtime of one vLLM worker process.

Built on the first graph vLLM compiles (``protocol.VllmHostPass``), for the whole model read from
vLLM's forward context (``model``): the placement controller (redundant slots extend vLLM's expert
tensors to E + R rows), the configured passes, the ops the passes emit for vLLM's own graph forms
(``mla_op``), and the serving loop (``serving``: count gate, load files, online rebalancing).
``VllmRuntime.current`` is the runtime this process built (``control`` reaches it there);
``close()`` releases it.
"""

from __future__ import annotations

import atexit
import logging

import torch
import torch.fx as fx

from omni_passes.config import PassConfig

log = logging.getLogger("omni_passes")


class VllmRuntime:
    current: "VllmRuntime | None" = None

    def __init__(self, runtime, serving=None):
        self.runtime = runtime
        self.serving = serving

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
    def create(cls, graph: fx.Graph, config: PassConfig) -> "VllmRuntime":
        from omni_passes.hosts.vllm import model as vllm_model
        from omni_passes.registry import build_runtime

        moe_layers = vllm_model.forward_context_moe_layers()
        info = vllm_model.model_info(graph, moe_layers)
        rows = vllm_model.rows_factory(moe_layers, vllm_model.graph_isa(graph)) if moe_layers else None
        why = None if rows else "no vLLM forward context while compiling, so the MoE layers' weights cannot be reached"
        runtime = build_runtime(config, info, device=graph_device(graph), rows=rows, cannot_extend=why,
                                host_ops=host_ops())
        serving = attach_serving(runtime)
        cls.current = cls(runtime, serving)
        return cls.current

    def run(self, graph: fx.Graph) -> None:
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


def host_ops() -> dict:
    """The ops the graph passes emit for vLLM's own graph forms, by the name a pass asks for."""

    def sparse_mla_attention():
        from omni_passes.hosts.vllm.mla_op import sparse_mla_attention_op

        return sparse_mla_attention_op()

    return {"vllm_sparse_mla_attention": sparse_mla_attention}


def attach_serving(runtime):
    """Per-step serving work for a vLLM model (``serving``): the count gate, the load files,
    the online rebalancer. None without the dispatch pass."""
    from kernels.state import add_step_hook
    from omni_passes.hosts.vllm.serving import LoadExport, OnlineRebalancer, ServingSteps

    controller, config = runtime.controller, runtime.config
    if controller is None:
        return None
    export = None
    if config.expert_load_path or config.slot_load_path:
        export = LoadExport(controller, config.expert_load_path, config.slot_load_path, config.expert_load_interval_steps)
    rebalancer = OnlineRebalancer(controller, config.rebalance) if config.rebalance is not None else None
    serving = ServingSteps(controller, serving_forward, export, rebalancer)
    add_step_hook(controller.handle, serving)
    runtime.closers.append(serving.close)
    atexit.register(serving.close)
    return serving


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
