"""OmniPlacement planner: expert loads → redundant-expert placement that balances ranks.

Given loads ``[L, E]`` (tokens per logical expert and MoE layer) and a cluster of ``R``
ranks on ``N`` nodes with ``S`` slots each (``R * S >= E``; the surplus is the redundancy
budget), choose for every layer which logical expert each of the ``R * S`` slots holds so
that the most loaded rank carries as little as possible. The metric is
``omni_passes.placement.metrics`` (a logical expert's tokens split evenly over its replicas).

``plan`` is the entry point; the steps live one topic per module, vectorised over layers
(one numpy step handles all rows at once):

0. ``forecast`` - for a per-step series ``[T, L, E]``, the load to plan for (a backtested
   exponentially weighted mean; EPLB plans on the window sum).
1. ``packing`` - replica counts (greedy on per-replica load), LPT packing onto ranks with no
   two copies of an expert on one rank, hierarchical mode (groups onto nodes first), and
   rank order spread over nodes.
2. ``search`` - swaps between heavy and light ranks that LPT's last items had no room for.
3. Safety net (here): a layer never ends worse than the identity placement.
4. ``migration`` - with ``previous``: repair the running placement or align the fresh plan to
   it, and keep each layer's old row unless the gain is worth the moved slots.

Hierarchical mode (``num_groups`` > 1 and divisible by ``num_nodes`` > 1, as EPLB): the
expert groups of DeepSeek's group-limited routing are packed onto nodes first, then each node
solves steps 1-2 for its own experts on its own ranks. Otherwise planning is global.

All functions are pure: numpy/torch arrays in, new arrays out; ``plan`` returns a new
``Placement``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from omni_passes.placement.forecast import forecast_loads
from omni_passes.placement.migration import align_to_previous, choose_rows, repair
from omni_passes.placement.packing import effective_cap, plan_hierarchical, plan_rows, spread_nodes
from omni_passes.placement.placement import Placement
from omni_passes.placement.search import row_balancedness


class PlanError(ValueError):
    """Inputs the planner cannot use; the message names the argument and the value."""


@dataclass(frozen=True)
class PlanOptions:
    """Knobs of the planner (defaults are what the CLI and the bench use).

    Attributes:
        local_search: run ``refine_swaps`` after packing.
        swap_rounds: most rounds per phase of ``refine_swaps``.
        forecast: for a per-step series, plan on ``forecast_loads`` instead of its sum.
        repair_rounds: with ``previous``, rounds per phase of swaps that repair the previous
            placement under the new loads (each swap moves two slots).
        spread_nodes: reorder ranks so heavy ranks land on different nodes (global mode).
        min_gain: with ``previous``, keep a layer's old row unless the new one improves its
            balancedness (mean/max) by at least this much (absolute).
        max_moves: with ``previous``, most (layer, slot) changes allowed in total.
    """

    local_search: bool = True
    swap_rounds: int = 12
    forecast: bool = True
    repair_rounds: int = 4
    spread_nodes: bool = True
    min_gain: float = 0.0
    max_moves: int | None = None


# ---------------------------------------------------------------------------------------------
# Input checks


def check_inputs(
    loads: torch.Tensor | np.ndarray,
    num_ranks: int,
    num_nodes: int,
    slots_per_rank: int,
    num_groups: int = 1,
    max_replicas: int | None = None,
    previous: Placement | None = None,
) -> np.ndarray:
    """Validate planner inputs; return the loads as float64 ``[L, E]`` or ``[T, L, E]``.

    Raises:
        PlanError naming the argument and the offending value.
    """
    arr = loads.detach().cpu().numpy() if isinstance(loads, torch.Tensor) else np.asarray(loads)
    if arr.ndim not in (2, 3):
        raise PlanError(
            f"loads must be [moe_layers, experts] or [steps, moe_layers, experts], got shape {tuple(arr.shape)}"
        )
    if 0 in arr.shape:
        raise PlanError(f"loads must not be empty, got shape {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.number) and not np.iscomplexobj(arr)):
        raise PlanError(f"loads must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise PlanError(f"loads{list(where)} is {arr[where]} (loads must be finite)")
    if (arr < 0).any():
        where = tuple(int(i) for i in np.argwhere(arr < 0)[0])
        raise PlanError(f"loads{list(where)} = {arr[where]} is negative (loads are token counts)")
    num_layers, num_experts = arr.shape[-2:]
    for name, value in (("ranks", num_ranks), ("nodes", num_nodes), ("slots_per_rank", slots_per_rank), ("groups", num_groups)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    if num_ranks % num_nodes:
        raise PlanError(f"ranks ({num_ranks}) is not divisible by nodes ({num_nodes})")
    if num_ranks * slots_per_rank < num_experts:
        raise PlanError(
            f"{num_ranks} ranks x {slots_per_rank} slots = {num_ranks * slots_per_rank} slots are too few for "
            f"{num_experts} experts (every expert needs a slot); use at least {-(-num_experts // num_ranks)} slots per rank"
        )
    if num_experts % num_groups:
        raise PlanError(f"experts ({num_experts}) are not divisible into groups ({num_groups})")
    if max_replicas is not None:
        if not isinstance(max_replicas, (int, np.integer)) or isinstance(max_replicas, bool) or max_replicas <= 0:
            raise PlanError(f"max_replicas must be a positive integer, got {max_replicas!r}")
        if max_replicas * num_experts < num_ranks * slots_per_rank:
            raise PlanError(
                f"max_replicas {max_replicas} x {num_experts} experts cannot fill {num_ranks * slots_per_rank} slots"
            )
    if _hierarchical(num_groups, num_nodes):
        per_node = num_experts // num_nodes
        if per_node > (num_ranks // num_nodes) * slots_per_rank:
            raise PlanError(
                f"hierarchical planning puts {per_node} experts on each node, but a node has only "
                f"{(num_ranks // num_nodes) * slots_per_rank} slots"
            )
        if max_replicas is not None and max_replicas * per_node < (num_ranks // num_nodes) * slots_per_rank:
            raise PlanError(
                f"max_replicas {max_replicas} x {per_node} experts per node cannot fill a node's "
                f"{(num_ranks // num_nodes) * slots_per_rank} slots (hierarchical planning keeps replicas on the group's node)"
            )
    if previous is not None:
        shape = (previous.num_layers, previous.num_logical_experts, previous.num_ranks, previous.slots_per_rank)
        if shape != (num_layers, num_experts, num_ranks, slots_per_rank):
            raise PlanError(
                f"previous placement is for {previous.num_layers} layers x {previous.num_logical_experts} experts on "
                f"{previous.num_ranks} ranks x {previous.slots_per_rank} slots, but the plan asks for {num_layers} x "
                f"{num_experts} on {num_ranks} x {slots_per_rank}"
            )
    return arr


def _hierarchical(num_groups: int, num_nodes: int) -> bool:
    return num_nodes > 1 and num_groups > 1 and num_groups % num_nodes == 0


def baseline_rows(num_layers: int, num_experts: int, num_ranks: int, num_nodes: int, slots_per_rank: int, num_groups: int) -> np.ndarray:
    """The identity placement (slot j holds expert j, spare slots repeat experts round robin),
    within each node's own experts in the hierarchical mode: int64 ``[L, R * S]``. The plan is
    never worse than this, layer by layer."""
    if not _hierarchical(num_groups, num_nodes):
        row = np.arange(num_ranks * slots_per_rank) % num_experts
    else:
        per_node, node_slots = num_experts // num_nodes, (num_ranks // num_nodes) * slots_per_rank
        row = (np.arange(num_nodes)[:, None] * per_node + np.arange(node_slots)[None, :] % per_node).ravel()
    return np.repeat(row[None, :].astype(np.int64), num_layers, axis=0)


# ---------------------------------------------------------------------------------------------
# Entry point


def plan(
    loads: torch.Tensor | np.ndarray,
    num_ranks: int,
    num_nodes: int,
    slots_per_rank: int,
    num_groups: int = 1,
    max_replicas: int | None = None,
    previous: Placement | None = None,
    options: PlanOptions = PlanOptions(),
) -> Placement:
    """Plan a placement for ``loads`` on ``num_ranks`` ranks (``num_nodes`` nodes) with
    ``slots_per_rank`` slots each. See the module docstring for the steps.

    Args:
        loads: ``[L, E]`` tokens per expert, or ``[T, L, E]`` per step (then planned on
            ``forecast_loads``, or on the sum with ``options.forecast=False``).

    Raises:
        PlanError: bad loads (shape, NaN, negative) or sizes (see ``check_inputs``).
    """
    weight = check_inputs(loads, num_ranks, num_nodes, slots_per_rank, num_groups, max_replicas, previous)
    if weight.ndim == 3:
        weight, _ = forecast_loads(weight) if options.forecast else (weight.sum(axis=0), None)
    num_layers, num_experts = weight.shape
    num_slots = num_ranks * slots_per_rank
    hierarchical = _hierarchical(num_groups, num_nodes)
    if hierarchical:
        phy2log = plan_hierarchical(weight, num_groups, num_nodes, num_ranks, slots_per_rank, max_replicas,
                                    options.local_search, options.swap_rounds)
    else:
        cap = effective_cap(max_replicas, num_ranks, num_slots, num_experts)
        phy2log = plan_rows(weight, num_ranks, slots_per_rank, cap, options.local_search, options.swap_rounds)
        if options.spread_nodes and previous is None:
            phy2log = spread_nodes(phy2log, weight, num_nodes, slots_per_rank)
    # Safety net: a layer never ends worse than the identity (only odd budgets ever need it;
    # skipped when the identity itself breaks the replica cap).
    base = baseline_rows(num_layers, num_experts, num_ranks, num_nodes, slots_per_rank, num_groups)
    if max_replicas is None or -(-num_slots // num_experts) <= max_replicas:
        worse = row_balancedness(base, weight, slots_per_rank) > row_balancedness(phy2log, weight, slots_per_rank)
        phy2log = np.where(worse[:, None], base, phy2log)
    if previous is not None:
        old = previous.phy2log.numpy()
        blocks = num_nodes if hierarchical else 1
        fresh = align_to_previous(phy2log, old, slots_per_rank, blocks)
        repaired = repair(old, weight, slots_per_rank, blocks, options.repair_rounds)
        phy2log = choose_rows([repaired, fresh], old, weight, slots_per_rank, options.min_gain, options.max_moves)
    return Placement(
        num_layers=num_layers,
        num_logical_experts=num_experts,
        num_ranks=num_ranks,
        num_nodes=num_nodes,
        slots_per_rank=slots_per_rank,
        phy2log=torch.from_numpy(np.ascontiguousarray(phy2log, dtype=np.int64)),
    )
