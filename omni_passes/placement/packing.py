"""Packing: loads → the experts each rank's slots hold, per MoE layer.

1. ``replica_counts`` - greedy: give the next spare slot to the expert with the largest
   per-replica load (``load / replicas``), never beyond the cap (``--max-replicas`` and, so
   replicas sit on distinct ranks, ``R``). As in EPLB and OmniInfer; ``replicate_hottest`` is
   the same rule on one device (spare slots appended after the identity, in the order given).
2. ``pack_lpt`` - longest processing time first: replicas by decreasing per-replica load,
   each onto the least loaded rank that has a free slot and no copy of that expert yet
   (OmniInfer; EPLB does not forbid two copies on one rank, which wastes the copy).
3. ``omni_passes.placement.search.refine_swaps`` - local search (ours), see there.
4. ``spread_nodes`` - rank order only: deal ranks to nodes heaviest first onto the lightest
   node, so hot ranks do not share a host's network (OmniInfer). The metric is unchanged.

``plan_rows`` runs steps 1-3 on independent rows; ``plan_hierarchical`` packs DeepSeek's expert
groups onto nodes first (the same LPT and swaps, with groups as items), then each node's own
experts onto its own ranks, so a token's groups still bound the nodes it visits.

All functions are pure: numpy/torch arrays in, new arrays out. ``B`` rows (MoE layers) are
packed at once; a row's slot ``j`` lives on rank ``j // S``.
"""

from __future__ import annotations

import numpy as np
import torch

from omni_passes.placement.search import refine_swaps, slot_weights


def replica_picks(weight: np.ndarray, spare: int, cap: int | None = None) -> np.ndarray:
    """The expert each spare slot goes to, in order: greedy on the largest per-replica load.

    Args:
        weight: float64 ``[B, E]`` loads.
        spare: slots beyond one per expert to give out.
        cap: most replicas any expert may get (``cap * E >= E + spare``; None: no cap).

    Returns:
        int64 ``[B, spare]``: pick ``i`` of a row is the expert with the largest
        ``load / replicas`` among those under the cap after picks ``0 .. i-1`` (ties: lowest id).
    """
    rows, num_experts = weight.shape
    counts = np.ones((rows, num_experts), dtype=np.int64)
    picks = np.empty((rows, spare), dtype=np.int64)
    index = np.arange(rows)
    for i in range(spare):
        per_replica = weight / counts if cap is None else np.where(counts < cap, weight / counts, -1.0)
        pick = per_replica.argmax(axis=1)
        counts[index, pick] += 1
        picks[:, i] = pick
    return picks


def replica_counts(weight: np.ndarray, num_slots: int, cap: int) -> np.ndarray:
    """Replicas per expert (``replica_picks`` counted).

    Args:
        weight: float64 ``[B, E]`` loads.
        num_slots: slots to fill per row (``>= E``).
        cap: most replicas any expert may get (``cap * E >= num_slots``).

    Returns:
        int64 ``[B, E]``, every entry in ``[1, cap]``, rows summing to ``num_slots``.
    """
    rows, num_experts = weight.shape
    picks = replica_picks(weight, num_slots - num_experts, cap)
    counts = np.ones((rows, num_experts), dtype=np.int64)
    np.add.at(counts, (np.arange(rows)[:, None], picks), 1)
    return counts


def replicate_hottest(loads: torch.Tensor, extra_slots: int) -> torch.Tensor:
    """One device's redundant placement: phy2log int64 ``[L, E + extra]``, slot ``e`` holds
    expert ``e`` and extra slot ``i`` the ``i``-th of ``replica_picks`` (no cap).

    Args:
        loads: ``[L, E]`` tokens per expert (e.g. ``controller.take_load()``).
    """
    num_experts = loads.shape[1]
    picks = replica_picks(loads.double().numpy(), extra_slots)
    identity = np.broadcast_to(np.arange(num_experts, dtype=np.int64), (loads.shape[0], num_experts))
    return torch.from_numpy(np.concatenate([identity, picks], axis=1))


def pack_lpt(weight: np.ndarray, counts: np.ndarray, num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """Place replicas onto ranks, heaviest first, each on the least loaded rank with a free
    slot and (if any such rank is left) no copy of the same expert.

    Args:
        weight: float64 ``[B, E]``; counts: int64 ``[B, E]`` replicas (rows sum to ``R * S``).

    Returns:
        phy2log int64 ``[B, R * S]``; slot ``j`` on rank ``j // S``.
    """
    rows, num_experts = weight.shape
    num_slots = num_ranks * slots_per_rank
    index = np.arange(rows)
    # The items: one per replica, expert ids repeated, sorted by per-replica load descending
    # (ties by expert id, so one expert's replicas are placed one after another).
    experts = np.repeat(np.arange(num_experts)[None, :], rows, axis=0)
    item_expert = np.empty((rows, num_slots), dtype=np.int64)
    for b in range(rows):  # np.repeat has no batched form; L small loops of C work
        item_expert[b] = np.repeat(experts[b], counts[b])
    item_load = np.take_along_axis(weight / counts, item_expert, axis=1)
    order = np.lexsort((item_expert, -item_load), axis=1)
    item_expert = np.take_along_axis(item_expert, order, axis=1)
    item_load = np.take_along_axis(item_load, order, axis=1)

    rank_load = np.zeros((rows, num_ranks))
    free = np.full((rows, num_ranks), slots_per_rank, dtype=np.int64)
    slot_of = np.empty((rows, num_slots), dtype=np.int64)
    # One expert's replicas are consecutive items, so "ranks holding this expert" is just
    # the ranks used since the expert changed. A rank holding it is chosen only if no other
    # rank has room left.
    holding = np.zeros((rows, num_ranks), dtype=bool)
    previous = np.full(rows, -1, dtype=np.int64)
    blocked_penalty = (2.0 * weight.sum(axis=1) + 1.0)[:, None]
    for j in range(num_slots):
        e = item_expert[:, j]
        holding &= (e == previous)[:, None]
        previous = e
        cost = rank_load + holding * blocked_penalty
        cost[free == 0] = np.inf
        r = cost.argmin(axis=1)
        slot_of[:, j] = r * slots_per_rank + (slots_per_rank - free[index, r])
        rank_load[index, r] += item_load[:, j]
        free[index, r] -= 1
        holding[index, r] = True
    phy2log = np.empty((rows, num_slots), dtype=np.int64)
    np.put_along_axis(phy2log, slot_of, item_expert, axis=1)
    return phy2log


def spread_nodes(phy2log: np.ndarray, weight: np.ndarray, num_nodes: int, slots_per_rank: int) -> np.ndarray:
    """Permute whole ranks so node loads are balanced: heaviest rank first onto the lightest
    node with a free rank. Per-rank contents (and so the metric) are unchanged.

    Args/returns: phy2log int64 ``[B, P]``.
    """
    rows, num_slots = phy2log.shape
    num_ranks = num_slots // slots_per_rank
    if num_nodes <= 1 or num_nodes == num_ranks:
        return phy2log
    per_node = num_ranks // num_nodes
    rank_load = slot_weights(phy2log, weight).reshape(rows, num_ranks, slots_per_rank).sum(-1)
    order = np.argsort(-rank_load, axis=1, kind="stable")
    node_load = np.zeros((rows, num_nodes))
    free = np.full((rows, num_nodes), per_node)
    new_rank = np.empty((rows, num_ranks), dtype=np.int64)
    index = np.arange(rows)
    for i in range(num_ranks):
        r = order[:, i]
        cost = np.where(free > 0, node_load, np.inf)
        node = cost.argmin(axis=1)
        new_rank[index, r] = node * per_node + (per_node - free[index, node])
        node_load[index, node] += rank_load[index, r]
        free[index, node] -= 1
    blocks = phy2log.reshape(rows, num_ranks, slots_per_rank)
    out = np.empty_like(blocks)
    out[index[:, None], new_rank] = blocks
    return out.reshape(rows, num_slots)


def plan_rows(
    weight: np.ndarray, num_ranks: int, slots_per_rank: int, cap: int, local_search: bool = True, swap_rounds: int = 12
) -> np.ndarray:
    """Replica counts, LPT packing and (``local_search``) swaps for independent rows:
    ``weight [B, E]`` → phy2log int64 ``[B, R * S]``."""
    num_slots = num_ranks * slots_per_rank
    distinct = cap <= num_ranks
    counts = replica_counts(weight, num_slots, cap)
    phy2log = pack_lpt(weight, counts, num_ranks, slots_per_rank)
    if local_search:
        phy2log = refine_swaps(phy2log, weight, slots_per_rank, swap_rounds, distinct)
    return phy2log


def effective_cap(max_replicas: int | None, num_ranks: int, num_slots: int, num_experts: int) -> int:
    """Most replicas per expert: the user's cap, and at most one per rank so copies sit on
    distinct ranks, unless that cannot fill the slots (then the user's cap, or the least
    that fills them, and copies share ranks)."""
    cap = min(max_replicas or num_slots, num_ranks)
    if cap * num_experts < num_slots:
        cap = max_replicas or -(-num_slots // num_experts)
    return cap


def plan_hierarchical(
    weight: np.ndarray,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    slots_per_rank: int,
    max_replicas: int | None = None,
    local_search: bool = True,
    swap_rounds: int = 12,
) -> np.ndarray:
    """Groups onto nodes, then each node on its own: ``weight [L, E]`` → phy2log ``[L, R * S]``."""
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    ranks_per_node = num_ranks // num_nodes
    # Groups are items of one replica each; nodes are "ranks" with groups_per_node slots.
    group_weight = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    ones = np.ones_like(group_weight, dtype=np.int64)
    node_groups = pack_lpt(group_weight, ones, num_nodes, groups_per_node)
    if local_search:
        node_groups = refine_swaps(node_groups, group_weight, groups_per_node, swap_rounds)
    # node_experts[l, n, i]: the i-th logical expert living on node n.
    node_groups = node_groups.reshape(num_layers, num_nodes, groups_per_node)
    node_experts = (node_groups[..., None] * group_size + np.arange(group_size)).reshape(num_layers, num_nodes, -1)
    sub_weight = np.take_along_axis(weight, node_experts.reshape(num_layers, -1), axis=1)
    sub_weight = sub_weight.reshape(num_layers * num_nodes, -1)
    node_cap = effective_cap(max_replicas, ranks_per_node, ranks_per_node * slots_per_rank, sub_weight.shape[1])
    local = plan_rows(sub_weight, ranks_per_node, slots_per_rank, node_cap, local_search, swap_rounds)
    local = local.reshape(num_layers, num_nodes, -1)
    return np.take_along_axis(node_experts, local, axis=2).reshape(num_layers, -1)
