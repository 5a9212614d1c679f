"""``omni_passes.compile(model, config, backend=...)``: torch.compile with the omni passes.

The passes run on the post-grad (aten-level, functionalized) graph; then Inductor (CPU or
CUDA) or torchair (Ascend) compiles it. Model-level preparation happens here, before
tracing: the placement's dispatch tables and load counters are created on the model's
device, and with redundant slots (R > 0) the expert weights are materialised into slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from omni_passes.config import PassConfig
from omni_passes.fx.redundant_experts import RedundantExpertDispatchPass
from omni_passes.model_info import MoEModelInfo
from omni_passes.pass_manager import OmniPassManager
from omni_passes.placement.materialize import PhysicalExperts
from omni_passes.placement.placement import Placement
from omni_passes.placement.runtime import ExpertPlacementState

log = logging.getLogger("omni_passes")


@dataclass
class OmniRuntime:
    """What a compiled model carries besides its code: state the ops read, and the reports."""

    config: PassConfig
    info: MoEModelInfo
    manager: OmniPassManager
    placement_state: ExpertPlacementState | None = None
    experts: PhysicalExperts | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return self.manager.report()

    def apply_placement(self, placement: Placement) -> None:
        """Switch placement in place: tables and slot weights; no recompile."""
        if self.placement_state is None:
            raise RuntimeError("the redundant_experts pass is not enabled for this model")
        if self.experts is not None:
            self.experts.apply(placement)
        elif not bool((placement.phy2log == torch.arange(placement.num_slots) % placement.num_logical_experts).all()):
            raise RuntimeError("expert weights were not materialised into slots; only the identity placement applies")
        self.placement_state.apply(placement)


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def resolve_placement(config: PassConfig, info: MoEModelInfo, placement: Placement | None = None) -> Placement:
    """The placement to use: given, else the config's file, else identity; checked against
    the model's MoE layers and experts."""
    if placement is None and config.placement:
        placement = Placement.load(config.placement)
    if placement is None:
        return Placement.identity(max(len(info.moe_layer_ids), 1), max(info.num_experts, 1))
    if info.moe_layer_ids:
        source = f"placement file {config.placement}" if config.placement else "placement"
        placement.check_fits(len(info.moe_layer_ids), info.num_experts, source=source)
    return placement


def sparse_attention_pass(config: PassConfig, info: MoEModelInfo):
    """The configured SparseAttentionPass; a pattern naming a missing layer is a ConfigError."""
    from omni_passes.config import ConfigError
    from omni_passes.fx.sparse_attention import SparseAttentionPass

    attn = config.sparse_attention
    bad = [i for i in attn.pattern if i >= info.num_layers]
    if bad:
        raise ConfigError(f"{config.source}: sparse_attention.pattern names layer(s) {bad}; the model has {info.num_layers} layers")
    return SparseAttentionPass(sink=attn.sink, recent=attn.recent, pattern=list(attn.pattern))


def prepare(model: nn.Module, config: PassConfig, placement: Placement | None = None) -> OmniRuntime:
    """Build the passes and run-time state for ``model`` (mutates it when R > 0)."""
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        raise ValueError("model has no .config: omni_passes.compile expects a HuggingFace-style DeepSeek model")
    info = MoEModelInfo.from_hf_config(hf_config)
    passes: list = []
    state = experts = None
    extras: dict[str, Any] = {}
    if "redundant_experts" in config.passes:
        if not info.moe_layer_ids:
            log.warning("model config has no MoE layers; the redundant_experts pass will report that")
        placement = resolve_placement(config, info, placement)
        state = ExpertPlacementState(placement, device=model_device(model))
        redundant = placement.num_slots > placement.num_logical_experts
        if redundant:
            experts = PhysicalExperts(model, placement)
        passes.append(
            RedundantExpertDispatchPass(state, moe_layer_ids=list(info.moe_layer_ids) or None, require_all=redundant)
        )
    if "sparse_attention" in config.passes:
        passes.append(sparse_attention_pass(config, info))
    if "latent_attention" in config.passes:  # after sparse_attention: it takes over its sparse sites
        from omni_passes.fx.latent_attention import LatentAttentionPass

        attn = config.sparse_attention if "sparse_attention" in config.passes else None
        passes.append(LatentAttentionPass(window=(attn.sink, attn.recent) if attn else None,
                                          pattern=list(attn.pattern) if attn else ()))
    fingerprint = config.fingerprint() + (placement.fingerprint() if placement is not None else "")
    manager = OmniPassManager(passes, fingerprint=fingerprint, report_path=config.report_path)
    return OmniRuntime(config=config, info=info, manager=manager, placement_state=state, experts=experts, extras=extras)


def inductor_backend(manager: OmniPassManager, **inductor_patches: Any) -> Callable:
    """A torch.compile backend: the omni passes as Inductor's post-grad custom pass."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        patches = {
            "post_grad_custom_post_pass": manager,
            # The rewrite attaches persistent tensors to the graph; a cache hit would skip the
            # pass (no report) and could hand back copies of those tensors. Always compile.
            "fx_graph_cache": False,
            **inductor_patches,
        }
        with torch._functorch.config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, config_patches=patches)

    return backend


def compile(  # noqa: A001  (mirrors torch.compile on purpose)
    model: nn.Module,
    config: PassConfig | dict | str | None = None,
    backend: str = "inductor",
    placement: Placement | None = None,
    fullgraph: bool = True,
    dynamic: bool | None = None,
    mode: str | None = None,
    **inductor_patches: Any,
) -> nn.Module:
    """Compile ``model`` with the configured omni passes.

    Returns the ``torch.compile``d module with ``.omni`` (an ``OmniRuntime``) attached: the
    placement state, the reports, and ``apply_placement``.
    """
    if config is None:
        config = PassConfig()
    elif isinstance(config, dict):
        config = PassConfig.from_dict(config)
    elif isinstance(config, str):
        config = PassConfig.load(config)
    runtime = prepare(model, config, placement)
    if backend == "inductor":
        compiler = inductor_backend(runtime.manager, **inductor_patches)
        if mode is not None:
            raise ValueError("mode= is not supported with backend='inductor' here; pass inductor options as keywords")
    elif backend == "torchair":
        from omni_passes.torchair_backend import torchair_backend

        compiler = torchair_backend(runtime.manager)
    else:
        raise ValueError(f"unknown backend {backend!r}: use 'inductor' or 'torchair'")
    compiled = torch.compile(model, backend=compiler, fullgraph=fullgraph, dynamic=dynamic)
    compiled.omni = runtime
    return compiled
