"""``omni_passes.compile(model, config, backend=...)``: torch.compile with the omni passes.

The passes run on the post-grad (aten-level, functionalized) graph of every graph
torch.compile produces; then Inductor (CPU or CUDA) or torchair (Ascend) compiles it.
Model-level preparation happens here, before tracing, through the shared runtime builder
(``omni_passes.registry.build_runtime``): the placement controller is created on the model's
device, and with redundant slots (R > 0) the experts' stacked tensors are extended to E + R
storage rows.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from omni_passes.config import ConfigError, PassConfig
from omni_passes.model_info import MoEModelInfo, attention_refusals, dispatch_refusal
from omni_passes.pass_manager import OmniPassManager
from omni_passes.placement.placement import Placement, PlacementError
from omni_passes.registry import OmniRuntime, build_runtime, resolve_placement, sparse_attention_pass  # noqa: F401


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def prepare(model: nn.Module, config: PassConfig, placement: Placement | None = None) -> OmniRuntime:
    """Build the passes and run-time state for ``model`` (extends its expert tensors when R > 0)."""
    from omni_passes.placement.materialize import transformers_expert_rows

    hf_config = getattr(model, "config", None)
    if hf_config is None:
        raise ValueError("model has no .config: omni_passes.compile expects a HuggingFace-style DeepSeek model")
    info = MoEModelInfo.from_hf_config(hf_config)
    refuse_unsafe(model, config)

    def rows(layout):
        from omni_passes.model_info import experts_modules

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


def inductor_backend(manager: OmniPassManager, **inductor_patches: Any) -> Callable:
    """A torch.compile backend: the omni passes as Inductor's post-grad custom pass."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        patches = {
            "post_grad_custom_post_pass": manager,
            # The rewrite binds the graph to persistent tensors of this process; a cache hit
            # would skip the pass (no report) and could hand back copies of those tensors.
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
    placement controller, the reports, and ``apply_placement``.
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
