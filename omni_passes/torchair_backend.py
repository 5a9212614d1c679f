"""Ascend graph mode: the omni passes inside torchair's compile pipeline. UNVERIFIED.

No Ascend hardware, torch_npu or torchair is reachable from this project's machines, so this
adapter is written against torchair's documented interfaces and has never run:
- ``torchair.CompilerConfig`` / ``torchair.get_npu_backend(compiler_config=...)``;
- the post-grad custom pass hook, a callable ``fn(gm, example_inputs, config)`` on the
  GraphModule (``config.experimental_config.post_grad_custom_post_pass``);
- GE converters for the omni ops (``kernels/torchair_converters.py``), registered with
  ``register_fx_node_ge_converter``.
The pass logic is the same ``OmniPassManager`` Inductor runs; this module is only the glue.
"""

from __future__ import annotations

from typing import Any, Callable

from omni_passes.pass_manager import OmniPassManager

HOOK_OWNER = "experimental_config"
HOOK_NAME = "post_grad_custom_post_pass"


class TorchairUnavailable(RuntimeError):
    pass


def post_grad_hook(manager: OmniPassManager) -> Callable:
    """torchair's hook calling convention over the shared pass manager."""

    def omni_post_grad_pass(gm, example_inputs, config) -> Any:
        manager(gm.graph)
        gm.recompile()
        return gm

    omni_post_grad_pass.uuid = manager.uuid  # for torchair's compile cache key, where it asks
    return omni_post_grad_pass


def torchair_backend(manager: OmniPassManager, compiler_config: Any = None) -> Callable:
    try:
        import torch_npu  # noqa: F401
        import torchair
    except ImportError as exc:
        raise TorchairUnavailable(
            f"backend='torchair' needs torch_npu and torchair (Ascend NPU); import failed: {exc}. "
            "Install the 'ascend' extra on an Ascend machine, or use backend='inductor'."
        ) from None
    import kernels.torchair_converters  # noqa: F401  (registers GE converters for omni ops)

    config = compiler_config or torchair.CompilerConfig()
    owner = getattr(config, HOOK_OWNER, None)
    if owner is None or not hasattr(owner, HOOK_NAME):
        raise TorchairUnavailable(
            f"this torchair has no CompilerConfig.{HOOK_OWNER}.{HOOK_NAME}; the omni passes cannot be hooked in"
        )
    setattr(owner, HOOK_NAME, post_grad_hook(manager))
    return torchair.get_npu_backend(compiler_config=config)
