"""Expert weights in physical slots: E logical experts → E + R slots on one device.

A transformers DeepSeek MoE layer keeps its routed experts as stacked weights
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``). With a placement of
``num_slots`` slots, each stacked weight is replaced by ``[num_slots, ...]`` where slot j holds
a copy of expert ``phy2log[j]``, and the experts module is told it has ``num_slots`` experts
(its grouped GEMM then runs over slots). Routing still produces logical ids; the dispatch
pass maps them to slots.

No copy of the logical weights is kept (it would double the experts' memory: at DeepSeek-V3
scale 22.5 GB per MoE layer). A new placement is applied in place from the slots themselves:
every logical expert has at least one slot in any valid placement, so each slot whose expert
changes is filled from a slot that holds that expert now. Only the changed slots are copied
(through a temporary of their size, so a slot is read before any write); slot tensors keep
their identity, shape and device, so a compiled model is not recompiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omni_passes.placement.placement import Placement, PlacementError

STACKED_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj", "up_proj", "gate_proj")


@dataclass
class _SlottedLayer:
    experts: nn.Module
    physical: dict[str, nn.Parameter]   # name → [num_slots, ...] slot weights (what the model uses)


def find_stacked_experts(model: nn.Module, num_experts: int) -> list[nn.Module]:
    """Experts modules holding stacked ``[E, ...]`` weights, in model order."""
    found = []
    for module in model.modules():
        names = [n for n in STACKED_EXPERT_WEIGHTS if isinstance(getattr(module, n, None), nn.Parameter)]
        if names and all(getattr(module, n).dim() == 3 and getattr(module, n).shape[0] == num_experts for n in names):
            if hasattr(module, "num_experts"):
                found.append(module)
    return found


def stacked_expert_tensors(module: nn.Module, num_experts: int) -> list[str]:
    """Every per-expert tensor of an experts module: its own parameters stacked ``[E, ...]``,
    weights and biases alike (GPT-OSS has ``gate_up_proj_bias [E, 2I]``, ``down_proj_bias
    [E, H]``). All of them are indexed by the same expert id, so all must move to slots: one
    left at ``[E, ...]`` is indexed by slot ids past its end."""
    return [name for name, tensor in module.named_parameters(recurse=False)
            if tensor.dim() >= 1 and tensor.shape[0] == num_experts]


class PhysicalExperts:
    """The slot weights of every MoE layer of one model, and their in-place update."""

    def __init__(self, model: nn.Module, placement: Placement):
        experts_modules = find_stacked_experts(model, placement.num_logical_experts)
        if len(experts_modules) != placement.num_layers:
            raise PlacementError(
                f"placement has {placement.num_layers} MoE layers but the model has "
                f"{len(experts_modules)} experts modules with stacked [{placement.num_logical_experts}, ...] weights"
            )
        self.placement = placement
        self.layers: list[_SlottedLayer] = []
        for row, module in enumerate(experts_modules):
            physical = {}
            for name in stacked_expert_tensors(module, placement.num_logical_experts):
                weight = getattr(module, name)
                slots = weight.detach().index_select(0, placement.phy2log[row].to(weight.device))
                physical[name] = nn.Parameter(slots, requires_grad=False)
                setattr(module, name, physical[name])
            module.num_experts = placement.num_slots
            self.layers.append(_SlottedLayer(module, physical))

    def apply(self, placement: Placement) -> None:
        """Rewrite the slot weights for ``placement`` in place (same tensors, new contents)."""
        if placement.num_slots != self.placement.num_slots or placement.num_layers != len(self.layers):
            raise PlacementError("new placement has a different number of slots or MoE layers than the materialised one")
        for row, layer in enumerate(self.layers):
            old, new = self.placement.phy2log[row].long().cpu(), placement.phy2log[row].long().cpu()
            changed = (new != old).nonzero().flatten()
            if changed.numel() == 0:
                continue
            # a slot holding each logical expert now (which one, when there are several, does not
            # matter: replicas are identical)
            holder = torch.empty(placement.num_logical_experts, dtype=torch.long)
            holder[old] = torch.arange(old.numel())
            source = holder[new[changed]]
            for slots in layer.physical.values():
                with torch.no_grad():
                    moved = slots.data.index_select(0, source.to(slots.device))  # read all before writing
                    slots.data.index_copy_(0, changed.to(slots.device), moved)
        self.placement = placement

    def slot_bytes(self) -> int:
        """Bytes held by replica slots beyond one copy per logical expert."""
        extra = self.placement.num_slots - self.placement.num_logical_experts
        per_expert = sum(t[0].numel() * t.element_size() for layer in self.layers for t in layer.physical.values())
        return extra * per_expert
