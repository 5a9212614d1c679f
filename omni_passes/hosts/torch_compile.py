"""``omni_passes.compile(model, config, backend=...)``: torch.compile with the omni passes.

The passes run on the post-grad (aten-level, functionalized) graph of every graph
torch.compile produces; then Inductor (CPU or CUDA) or torchair (Ascend) compiles it.
Model-level preparation happens here, before tracing, through the shared runtime builder
(``omni_passes.registry.prepare``): the placement controller is created on the model's
device, and with redundant slots (R > 0) the experts' stacked tensors are extended to E + R
storage rows. ``backend="torchair"`` hands the same runtime to ``omni_passes.hosts.torchair``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from omni_passes.config import PassConfig
from omni_passes.pass_manager import OmniPassManager
from omni_passes.placement.placement import Placement
from omni_passes.registry import prepare


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
        from omni_passes.hosts.torchair import torchair_backend  # Ascend only: imported when asked for

        compiler = torchair_backend(runtime.manager)
    else:
        raise ValueError(f"unknown backend {backend!r}: use 'inductor' or 'torchair'")
    compiled = torch.compile(model, backend=compiler, fullgraph=fullgraph, dynamic=dynamic)
    compiled.omni = runtime
    return compiled
