"""Ascend graph mode: the omni passes inside torchair's compile pipeline.

torchair (shipped in torch_npu as ``torch_npu/dynamo/torchair``) compiles a dynamo graph with
aot_autograd, runs its FX passes, then converts every FX node to Ascend IR (GE) through
registered converters and hands the GE graph to CANN. Its post-grad hook is
``CompilerConfig.post_grad_custom_post_pass``: a callable ``fn(gm, example_inputs, config)``
run on the aten-level GraphModule after torchair's own FX passes and before GE conversion
(torchair 2.9 to 2.14; older releases have no such hook and are refused with a message).

    config = torchair.CompilerConfig()
    install_hook(config, manager)                 # the omni passes on torchair's hook
    backend = torchair.get_npu_backend(compiler_config=config)

``torchair_backend(manager, config)`` does both and guards the GE graph's bound state (below).
GE converters for the omni ops are in ``kernels/torchair_converters*.py``.

Verified on CPU with torchair's real Python (the native Graph Engine stood in): the hook, the
converters, and every emitted GE op against torchair's IR prototypes. Not verified: GE shape
inference, CANN's kernel support, numerics and speed on an NPU (README, docs/ascend.md).

GE graphs cannot call back into Python: the placement tables are bound into the GE graph as
constants when it is built. A placement applied after that would leave the GE graph on the old
tables, so the compiled callable refuses to run once the tables differ (recompile instead). With
``debug.run_eagerly`` torchair runs the rewritten FX graph itself, whose ops read the live tables.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from omni_passes.pass_manager import OmniPassManager

HOOK_NAME = "post_grad_custom_post_pass"
SUPPORTED = "torchair 2.9 to 2.14 (torch_npu 2.9.0 to 2.14.x)"


class TorchairUnavailable(RuntimeError):
    pass


def post_grad_hook(manager: OmniPassManager) -> Callable:
    """torchair's hook calling convention over the shared pass manager: the GraphModule is
    rewritten in place (torchair keeps using the object it passed in)."""

    def omni_post_grad_pass(gm, example_inputs, config) -> Any:
        manager(gm.graph)
        gm.recompile()
        return gm

    omni_post_grad_pass.uuid = manager.uuid  # for torchair's compile cache key, where it asks
    return omni_post_grad_pass


def import_torchair():
    """The installed torchair (an Ascend machine), else TorchairUnavailable saying why."""
    try:
        import torch_npu  # noqa: F401  (makes torchair importable and registers the NPU device)
    except Exception as exc:  # noqa: BLE001  (without CANN torch_npu fails with OSError, ImportError, ...)
        npu_error = f"{type(exc).__name__}: {exc}"
    else:
        npu_error = None
    try:
        import torchair
    except ImportError:
        raise TorchairUnavailable(
            "backend='torchair' needs torch_npu and torchair (Ascend NPU); "
            f"import failed: {npu_error or 'torchair is not importable'}. "
            "Install the 'ascend' extra on an Ascend machine, or use backend='inductor'."
        ) from None
    return torchair


def install_hook(config: Any, manager: OmniPassManager) -> Any:
    """Put the omni passes on ``config``'s post-grad hook; refuses torchair without it."""
    if not hasattr(config, HOOK_NAME):
        owner = type(config).__module__
        raise TorchairUnavailable(
            f"this torchair ({owner}) has no CompilerConfig.{HOOK_NAME}, the hook the omni passes run on; "
            f"supported: {SUPPORTED}, where it is a top-level CompilerConfig option"
        )
    existing = getattr(config, HOOK_NAME).value
    if existing is not None:
        raise TorchairUnavailable(f"CompilerConfig.{HOOK_NAME} is already set to {existing!r}; "
                                  "the omni passes would replace it")
    setattr(config, HOOK_NAME, post_grad_hook(manager))
    return config


def register_converters() -> None:
    """GE converters for the omni ops and for aten/transformers ops torchair lacks."""
    import kernels.torchair_converters  # noqa: F401


def torchair_backend(manager: OmniPassManager, compiler_config: Any = None, torchair: Any = None) -> Callable:
    """``torchair.get_npu_backend`` with the omni passes on its hook. ``torchair``: the module
    to use (default: the installed one)."""
    torchair = torchair or import_torchair()
    register_converters()
    config = compiler_config if compiler_config is not None else torchair.CompilerConfig()
    install_hook(config, manager)
    npu_backend = torchair.get_npu_backend(compiler_config=config)
    if config.debug.run_eagerly:
        return npu_backend  # the rewritten FX graph runs; its ops read the live tables
    return functools.partial(_guarded_backend, npu_backend)


def _guarded_backend(npu_backend: Callable, gm, example_inputs):
    from kernels.torchair_converters import bound_keys, check_bound_tables

    before = bound_keys()
    compiled = npu_backend(gm, example_inputs)
    mine = bound_keys() - before  # the tables this graph's converters bound

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        check_bound_tables(mine)
        return compiled(*args, **kwargs)

    return run


def compile_for_ge_dump(model, config, dump_dir, torchair: Any = None):
    """``omni_passes.compile``'s torchair twin for ``omni-passes inspect --backend torchair``:
    the passes on torchair's hook, torchair's converters build the GE graph and dump it as text
    into ``dump_dir``; ``debug.run_eagerly``, so CANN compiles nothing and the rewritten FX graph
    runs. Returns the compiled module with ``.omni`` attached, as ``omni_passes.compile`` does."""
    import torch

    from omni_passes.registry import prepare

    torchair = torchair or import_torchair()
    runtime = prepare(model, config)
    compiler_config = torchair.CompilerConfig()
    compiler_config.debug.run_eagerly = True
    compiler_config.debug.graph_dump.type = "txt"
    compiler_config.debug.graph_dump.path = str(dump_dir)
    backend = torchair_backend(runtime.manager, compiler_config, torchair=torchair)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    compiled.omni = runtime
    return compiled
