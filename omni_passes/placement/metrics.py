"""The one balance metric used everywhere (planner, rebalancer, CLI, bench, tests).

Model: ``omni::expert_dispatch`` splits a logical expert's tokens evenly over its replicas,
so a slot holding expert ``e`` carries ``load[e] / replicas[e]``. A rank's load is the sum
over its ``slots_per_rank`` slots (slot ``j`` lives on rank ``j // S``). Per MoE layer:

* imbalance    = max rank load / mean rank load   (1 is perfect; what a decode step waits on)
* balancedness = mean rank load / max rank load   (1 is perfect; = 1 / imbalance)

A layer with no load at all counts as perfectly balanced (1). Reports give both per layer
and their mean over layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_passes.placement.placement import Placement


def _as_phy2log(placement: Placement | torch.Tensor) -> torch.Tensor:
    return placement.phy2log if isinstance(placement, Placement) else torch.as_tensor(placement)


def slot_loads(phy2log: torch.Tensor, loads: torch.Tensor) -> torch.Tensor:
    """Load each physical slot carries.

    Args:
        phy2log: int64 ``[L, P]`` logical expert of each slot.
        loads: ``[L, E]`` tokens per logical expert.

    Returns:
        float64 ``[L, P]``: ``loads[l, e] / replicas[l, e]`` for the expert ``e`` in the slot.
    """
    phy2log = torch.as_tensor(phy2log, dtype=torch.int64)
    loads = torch.as_tensor(loads).to(torch.float64)
    if phy2log.dim() != 2 or loads.dim() != 2 or phy2log.shape[0] != loads.shape[0]:
        raise ValueError(
            f"phy2log {tuple(phy2log.shape)} and loads {tuple(loads.shape)} must be [L, P] and [L, E] with the same L"
        )
    counts = torch.zeros_like(loads).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=torch.float64))
    per_replica = loads / counts.clamp(min=1.0)
    return per_replica.gather(1, phy2log)


def rank_loads(phy2log: torch.Tensor, loads: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
    """``[L, R]`` float64: the load of every rank, ``R = P // slots_per_rank``."""
    per_slot = slot_loads(phy2log, loads)
    num_layers, num_slots = per_slot.shape
    if num_slots % slots_per_rank:
        raise ValueError(f"{num_slots} slots are not a whole number of ranks of {slots_per_rank} slots")
    return per_slot.view(num_layers, num_slots // slots_per_rank, slots_per_rank).sum(-1)


def imbalance(ranks: torch.Tensor) -> torch.Tensor:
    """``[L]`` max/mean over the last dim of ``ranks [L, R]``; 1 for an all-zero layer."""
    peak = ranks.max(dim=-1).values
    mean = ranks.mean(dim=-1)
    return torch.where(peak > 0, peak / torch.where(mean > 0, mean, 1.0), torch.ones_like(peak))


def balancedness(ranks: torch.Tensor) -> torch.Tensor:
    """``[L]`` mean/max over the last dim of ``ranks [L, R]``; 1 for an all-zero layer."""
    return 1.0 / imbalance(ranks)


@dataclass(frozen=True)
class BalanceReport:
    """Per-layer and mean-over-layers balance of one placement under one load."""

    imbalance: list[float]
    balancedness: list[float]

    @property
    def mean_imbalance(self) -> float:
        return sum(self.imbalance) / len(self.imbalance)

    @property
    def mean_balancedness(self) -> float:
        return sum(self.balancedness) / len(self.balancedness)

    @property
    def worst_imbalance(self) -> float:
        return max(self.imbalance)

    def to_dict(self, per_layer: bool = True) -> dict:
        doc = {
            "mean_balancedness": self.mean_balancedness,
            "mean_imbalance": self.mean_imbalance,
            "worst_imbalance": self.worst_imbalance,
        }
        if per_layer:
            doc["per_layer_imbalance"] = self.imbalance
            doc["per_layer_balancedness"] = self.balancedness
        return doc


def score(placement: Placement | torch.Tensor, loads: torch.Tensor, slots_per_rank: int | None = None) -> BalanceReport:
    """Balance of ``placement`` (a Placement, or phy2log ``[L, P]`` with ``slots_per_rank``)
    under ``loads [L, E]``."""
    if isinstance(placement, Placement):
        slots_per_rank = placement.slots_per_rank
    elif slots_per_rank is None:
        raise ValueError("slots_per_rank is needed when scoring a bare phy2log tensor")
    ranks = rank_loads(_as_phy2log(placement), loads, slots_per_rank)
    imb = imbalance(ranks)
    return BalanceReport(imbalance=imb.tolist(), balancedness=(1.0 / imb).tolist())


def slots_changed(old: Placement | torch.Tensor, new: Placement | torch.Tensor) -> int:
    """Experts moved: (layer, slot) pairs whose logical expert differs, each a weight copy."""
    a, b = _as_phy2log(old), _as_phy2log(new)
    if a.shape != b.shape:
        raise ValueError(f"placements have different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return int((a != b).sum())
