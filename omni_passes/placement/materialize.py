"""Expert tensors in storage rows: E logical experts → P = E + R rows on one device.

A MoE layer keeps its routed experts as stacked tensors whose first dimension is the expert
(transformers: ``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``, and for
GPT-OSS the biases ``gate_up_proj_bias [E, 2I]``, ``down_proj_bias [E, H]``; vLLM's fused MoE:
``w13_weight``, ``w2_weight``, optional ``w13_bias``, ``w2_bias``, packed per expert). Every
such tensor is extended to ``[P, ...]`` storage in the compact layout
(``omni_passes.placement.layout``): rows ``0..E-1`` are the experts themselves, rows
``E..P-1`` copies of the replicated ones. Only the R extra rows cost memory: the
``[E, ...]`` original is dropped (transformers: the module's parameter becomes the ``[P, ...]``
storage and its ``num_experts`` becomes P, so its grouped GEMM runs over rows) or becomes a
view of the first E rows (vLLM, where the graph keeps reading its ``[E, ...]`` parameter).

A new placement rewrites only the extra rows whose expert changes, each copied from its
expert's own row (rows < E, never written, so no copy reads a row another one writes);
storage tensors keep their identity, shape and device, so nothing recompiles.
"""

from __future__ import annotations

import torch
from torch import nn

from omni_passes.placement.layout import RowLayout
from omni_passes.placement.placement import PlacementError


class ExpertRows:
    """The storage rows of every MoE layer's stacked expert tensors, and their in-place update.

    Args:
        storage: per MoE layer, name → ``[P, ...]`` tensor whose rows follow ``layout``.
        layout: the row layout the storage holds now.
        num_experts: E, the rows that hold the experts themselves.
    """

    def __init__(self, storage: list[dict[str, torch.Tensor]], layout: RowLayout, num_experts: int):
        if len(storage) != layout.slot_row.shape[0]:
            raise PlacementError(f"{len(storage)} MoE layers of expert tensors for a layout of {layout.slot_row.shape[0]}")
        self.storage = storage
        self.layout = layout
        self.num_experts = num_experts

    def apply(self, layout: RowLayout) -> int:
        """Copy the rows whose expert changes from ``self.layout`` to ``layout``; returns how many."""
        copied = 0
        for layer, rows in enumerate(layout.changed_rows(self.layout)):
            if rows.numel() == 0:
                continue
            sources = layout.row_expert[layer, rows]
            for tensor in self.storage[layer].values():
                with torch.no_grad():
                    device_rows = rows.to(tensor.device)
                    tensor.index_copy_(0, device_rows, tensor.index_select(0, sources.to(tensor.device)))
            copied += rows.numel()
        self.layout = layout
        return copied

    def extra_bytes(self) -> int:
        """Bytes of the replica rows beyond one row per logical expert."""
        extra = self.layout.num_rows - self.num_experts
        return sum(extra * t[0].numel() * t.element_size() for tensors in self.storage for t in tensors.values())


def extend_rows(original: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
    """``[E, ...]`` → ``[P, ...]`` storage: the experts, then copies of ``row_expert[E:]``."""
    num_experts = original.shape[0]
    storage = original.new_empty((row_expert.numel(), *original.shape[1:]))
    with torch.no_grad():
        storage[:num_experts].copy_(original)
        storage[num_experts:].copy_(original.index_select(0, row_expert[num_experts:].to(original.device)))
    return storage


def stacked_expert_tensors(module: nn.Module, num_experts: int) -> list[str]:
    """Every per-expert tensor of an experts module: its own parameters stacked ``[E, ...]``,
    weights and biases alike (GPT-OSS has ``gate_up_proj_bias [E, 2I]``, ``down_proj_bias
    [E, H]``). All of them are indexed by the same expert id, so all are extended to rows."""
    return [name for name, p in module.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == num_experts]


def find_stacked_experts(model: nn.Module, num_experts: int) -> list[nn.Module]:
    """Experts modules in model order: a ``num_experts`` attribute and at least one stacked
    matrix ``[E, a, b]`` among their own parameters (a router's ``[E, H]`` weight is not one)."""
    found = []
    for module in model.modules():
        if getattr(module, "num_experts", None) != num_experts:
            continue
        names = stacked_expert_tensors(module, num_experts)
        if any(getattr(module, n).dim() == 3 for n in names):
            found.append(module)
    return found


def transformers_expert_rows(modules: list[nn.Module], num_experts: int, layout: RowLayout) -> ExpertRows:
    """Extend transformers experts modules (one per MoE layer, in placement-row order) to
    ``layout`` in place (module docstring)."""
    storage = []
    for layer, module in enumerate(modules):
        tensors = {}
        for name in stacked_expert_tensors(module, num_experts):
            original = getattr(module, name)
            tensors[name] = nn.Parameter(extend_rows(original.detach(), layout.row_expert[layer]),
                                         requires_grad=original.requires_grad)
            setattr(module, name, tensors[name])
        module.num_experts = layout.num_rows
        storage.append(tensors)
    return ExpertRows(storage, layout, num_experts)
