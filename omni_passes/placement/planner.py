"""OmniPlacement planner: expert loads → redundant-expert placement that balances ranks.

Given loads ``[L, E]`` (tokens per logical expert and MoE layer) and a cluster of ``R``
ranks on ``N`` nodes with ``S`` slots each (``R * S >= E``; the surplus is the redundancy
budget), choose for every layer which logical expert each of the ``R * S`` slots holds so
that the most loaded rank carries as little as possible. The metric is
``omni_passes.placement.metrics`` (a logical expert's tokens split evenly over its replicas).

Pipeline, per layer but vectorised over layers (one numpy step handles all rows at once):

1. ``replica_counts`` - greedy: give the next spare slot to the expert with the largest
   per-replica load (``load / replicas``), never beyond the cap (``--max-replicas`` and, so
   replicas sit on distinct ranks, ``R``). As in EPLB and OmniInfer.
2. ``pack_lpt`` - longest processing time first: replicas by decreasing per-replica load,
   each onto the least loaded rank that has a free slot and no copy of that expert yet
   (OmniInfer; EPLB does not forbid two copies on one rank, which wastes the copy).
3. ``refine_swaps`` - local search (ours): repeatedly swap one slot of the most loaded rank
   with a slot elsewhere when that lowers the larger of the two ranks' loads; best swap
   first, until no swap helps. LPT with a fixed number of slots per rank leaves the last,
   smallest items no choice; the swaps repair exactly that.
4. ``spread_nodes`` - rank order only: deal ranks to nodes heaviest first onto the lightest
   node, so hot ranks do not share a host's network (OmniInfer). The metric is unchanged.

Hierarchical mode (``num_groups`` > 1 and divisible by ``num_nodes`` > 1, as EPLB): the
expert groups of DeepSeek's group-limited routing are packed onto nodes first (the same LPT
and swaps, with groups as items), then each node solves steps 1-3 for its own experts on its
own ranks, so a token's groups still bound the nodes it visits. Otherwise planning is global.

Migration awareness (``previous`` given, ours): the new plan's ranks are relabelled to keep
as many experts where they already are (greedy max-overlap matching; within a node in the
hierarchical mode), experts that stay on a rank keep their old slot, and a layer keeps its
previous row when the new one does not raise its balancedness by ``min_gain``; an optional
``max_moves`` keeps the layers with the best gain per moved slot within a budget.

All functions are pure: numpy/torch arrays in, new arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from omni_passes.placement.placement import Placement

_EPS = 1e-9


class PlanError(ValueError):
    """Inputs the planner cannot use; the message names the argument and the value."""


@dataclass(frozen=True)
class PlanOptions:
    """Knobs of the planner (defaults are what the CLI and the bench use).

    Attributes:
        local_search: run ``refine_swaps`` after packing.
        max_swap_rounds: cap on swap rounds (default ``4 * ranks``).
        spread_nodes: reorder ranks so heavy ranks land on different nodes (global mode).
        min_gain: with ``previous``, keep a layer's old row unless the new one improves its
            balancedness (mean/max) by at least this much (absolute).
        max_moves: with ``previous``, most (layer, slot) changes allowed in total.
    """

    local_search: bool = True
    max_swap_rounds: int | None = None
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
    """Validate planner inputs; return the loads as float64 ``[L, E]``. Raises PlanError."""
    arr = loads.detach().cpu().numpy() if isinstance(loads, torch.Tensor) else np.asarray(loads)
    if arr.ndim != 2:
        raise PlanError(f"loads must be [moe_layers, experts], got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise PlanError(f"loads must not be empty, got shape {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.number) and not np.iscomplexobj(arr)):
        raise PlanError(f"loads must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        layer, expert = np.argwhere(~np.isfinite(arr))[0]
        raise PlanError(f"loads[{layer}][{expert}] is {arr[layer, expert]} (loads must be finite)")
    if (arr < 0).any():
        layer, expert = np.argwhere(arr < 0)[0]
        raise PlanError(f"loads[{layer}][{expert}] = {arr[layer, expert]} is negative (loads are token counts)")
    num_layers, num_experts = arr.shape
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


# ---------------------------------------------------------------------------------------------
# Step 1: replica counts


def replica_counts(weight: np.ndarray, num_slots: int, cap: int) -> np.ndarray:
    """Replicas per expert, greedy on the largest per-replica load.

    Args:
        weight: float64 ``[B, E]`` loads.
        num_slots: slots to fill per row (``>= E``).
        cap: most replicas any expert may get (``cap * E >= num_slots``).

    Returns:
        int64 ``[B, E]``, every entry in ``[1, cap]``, rows summing to ``num_slots``.
    """
    rows, num_experts = weight.shape
    counts = np.ones((rows, num_experts), dtype=np.int64)
    index = np.arange(rows)
    for _ in range(num_slots - num_experts):
        per_replica = np.where(counts < cap, weight / counts, -1.0)
        pick = per_replica.argmax(axis=1)
        counts[index, pick] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# Step 2: longest-processing-time packing


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
    holds = np.zeros((rows, num_ranks, num_experts), dtype=bool)
    slot_of = np.empty((rows, num_slots), dtype=np.int64)
    # A blocked rank (already holds the expert) is chosen only if no other rank has room.
    blocked_penalty = (2.0 * weight.sum(axis=1) + 1.0)[:, None]
    for j in range(num_slots):
        e = item_expert[:, j]
        cost = rank_load + holds[index, :, e] * blocked_penalty
        cost[free == 0] = np.inf
        r = cost.argmin(axis=1)
        slot_of[:, j] = r * slots_per_rank + (slots_per_rank - free[index, r])
        rank_load[index, r] += item_load[:, j]
        free[index, r] -= 1
        holds[index, r, e] = True
    phy2log = np.empty((rows, num_slots), dtype=np.int64)
    np.put_along_axis(phy2log, slot_of, item_expert, axis=1)
    return phy2log


# ---------------------------------------------------------------------------------------------
# Step 3: local search


def slot_weights(phy2log: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """float64 ``[B, P]``: the load each slot carries (expert load / its replica count)."""
    rows, num_experts = weight.shape
    counts = np.zeros((rows, num_experts))
    np.add.at(counts, (np.arange(rows)[:, None], phy2log), 1.0)
    return np.take_along_axis(weight / np.maximum(counts, 1.0), phy2log, axis=1)


def refine_swaps(
    phy2log: np.ndarray, weight: np.ndarray, slots_per_rank: int, max_rounds: int | None = None, distinct: bool = True
) -> np.ndarray:
    """Swap slots between the most loaded rank and any other while that lowers the pair's max.

    Each round, for every row still improving, evaluates all ``S x (P - S)`` swaps of a slot
    on the max rank with a slot elsewhere, and applies the one giving the lowest
    ``max(new max-rank load, new other-rank load)`` if that is below the old max. Replica
    counts do not change; with ``distinct`` a swap never puts two copies on one rank.

    Args:
        phy2log: int64 ``[B, P]``; weight: float64 ``[B, E]``.

    Returns:
        a new int64 ``[B, P]`` whose per-row max rank load is never higher.
    """
    phy2log = phy2log.copy()
    rows, num_slots = phy2log.shape
    num_experts = weight.shape[1]
    num_ranks = num_slots // slots_per_rank
    if num_ranks < 2:
        return phy2log
    max_rounds = 4 * num_ranks if max_rounds is None else max_rounds
    w_slot = slot_weights(phy2log, weight)
    rank_load = w_slot.reshape(rows, num_ranks, slots_per_rank).sum(-1)
    holds = np.zeros((rows, num_ranks, num_experts), dtype=np.int16)
    slot_rank = np.arange(num_slots) // slots_per_rank
    np.add.at(holds, (np.arange(rows)[:, None], slot_rank[None, :], phy2log), 1)
    local = np.arange(slots_per_rank)
    active = np.arange(rows)
    for _ in range(max_rounds):
        if active.size == 0:
            break
        n = active.size
        sub = np.arange(n)
        loads_a = rank_load[active]  # [n, R]
        r_max = loads_a.argmax(axis=1)
        top = loads_a[sub, r_max]
        a_slots = r_max[:, None] * slots_per_rank + local  # [n, S]
        w_a = np.take_along_axis(w_slot[active], a_slots, axis=1)  # [n, S]
        e_a = np.take_along_axis(phy2log[active], a_slots, axis=1)
        w_b = w_slot[active]  # [n, P]
        e_b = phy2log[active]
        delta = w_a[:, :, None] - w_b[:, None, :]  # load leaving the max rank, [n, S, P]
        other = loads_a[:, slot_rank]  # [n, P]
        worst = np.maximum(top[:, None, None] - delta, other[:, None, :] + delta)
        bad = (delta <= _EPS * (top[:, None, None] + 1.0)) | (slot_rank[None, None, :] == r_max[:, None, None])
        if distinct:
            # b's rank must not hold a's expert, and the max rank must not hold b's expert.
            holds_a = holds[active[:, None], :, e_a]  # [n, S, R]
            bad |= holds_a[:, :, slot_rank] > 0
            holds_b = holds[active[:, None], r_max[:, None], e_b]  # [n, P]
            bad |= (holds_b > 0)[:, None, :]
        worst[bad] = np.inf
        flat = worst.reshape(n, -1)
        best = flat.argmin(axis=1)
        best_val = flat[sub, best]
        improves = best_val < top - _EPS * (top + 1.0)
        if not improves.any():
            break
        rows_i = active[improves]
        k = best[improves]
        sa = a_slots[improves, k // num_slots]
        sb = k % num_slots
        ea, eb = phy2log[rows_i, sa], phy2log[rows_i, sb]
        wa, wb = w_slot[rows_i, sa], w_slot[rows_i, sb]
        ra, rb = slot_rank[sa], slot_rank[sb]
        phy2log[rows_i, sa], phy2log[rows_i, sb] = eb, ea
        w_slot[rows_i, sa], w_slot[rows_i, sb] = wb, wa
        rank_load[rows_i, ra] += wb - wa
        rank_load[rows_i, rb] += wa - wb
        np.add.at(holds, (rows_i, ra, ea), -1)
        np.add.at(holds, (rows_i, ra, eb), 1)
        np.add.at(holds, (rows_i, rb, eb), -1)
        np.add.at(holds, (rows_i, rb, ea), 1)
        active = rows_i
    return phy2log


# ---------------------------------------------------------------------------------------------
# Step 4: spread heavy ranks over nodes


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


# ---------------------------------------------------------------------------------------------
# Whole plans


def plan_rows(
    weight: np.ndarray, num_ranks: int, slots_per_rank: int, cap: int, options: PlanOptions = PlanOptions()
) -> np.ndarray:
    """Steps 1-3 for independent rows: ``weight [B, E]`` → phy2log int64 ``[B, R * S]``."""
    num_slots = num_ranks * slots_per_rank
    distinct = cap <= num_ranks
    counts = replica_counts(weight, num_slots, cap)
    phy2log = pack_lpt(weight, counts, num_ranks, slots_per_rank)
    if options.local_search:
        phy2log = refine_swaps(phy2log, weight, slots_per_rank, options.max_swap_rounds, distinct)
    return phy2log


def plan_hierarchical(
    weight: np.ndarray,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    slots_per_rank: int,
    cap: int,
    options: PlanOptions = PlanOptions(),
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
    if options.local_search:
        node_groups = refine_swaps(node_groups, group_weight, groups_per_node, options.max_swap_rounds)
    # node_experts[l, n, i]: the i-th logical expert living on node n.
    node_groups = node_groups.reshape(num_layers, num_nodes, groups_per_node)
    node_experts = (node_groups[..., None] * group_size + np.arange(group_size)).reshape(num_layers, num_nodes, -1)
    sub_weight = np.take_along_axis(weight, node_experts.reshape(num_layers, -1), axis=1)
    sub_weight = sub_weight.reshape(num_layers * num_nodes, -1)
    local = plan_rows(sub_weight, ranks_per_node, slots_per_rank, min(cap, ranks_per_node) if cap <= num_ranks else cap, options)
    local = local.reshape(num_layers, num_nodes, -1)
    return np.take_along_axis(node_experts, local, axis=2).reshape(num_layers, -1)


# ---------------------------------------------------------------------------------------------
# Migration awareness


def align_to_previous(
    phy2log: np.ndarray, previous: np.ndarray, slots_per_rank: int, rank_blocks: int = 1
) -> np.ndarray:
    """Relabel ranks and reorder slots inside ranks so the plan keeps what already sits in place.

    Ranks are matched greedily by largest overlap of expert sets; with ``rank_blocks`` > 1
    (hierarchical plans) whole blocks of ranks (nodes) are matched first and ranks only
    within a block, so node contents stay whole. Within a rank, experts that were there keep
    their old slot. Per-rank contents, and so the metric, are unchanged.

    Args:
        phy2log, previous: int64 ``[L, P]``.

    Returns:
        int64 ``[L, P]``.
    """
    rows, num_slots = phy2log.shape
    num_ranks = num_slots // slots_per_rank
    num_experts = int(max(phy2log.max(), previous.max())) + 1
    new = phy2log.reshape(rows, num_ranks, slots_per_rank)
    old = previous.reshape(rows, num_ranks, slots_per_rank)

    def membership(x: np.ndarray, parts: int) -> np.ndarray:
        m = np.zeros((rows, parts, num_experts), dtype=np.float32)
        per = x.shape[1] * x.shape[2] // parts
        np.add.at(m, (np.arange(rows)[:, None], np.arange(num_ranks * slots_per_rank)[None, :] // per, x.reshape(rows, -1)), 1.0)
        return m

    def match(overlap: np.ndarray) -> np.ndarray:
        """Greedy max-weight matching per row of ``overlap [n, K, K]`` → perm [n, K] new→old."""
        n, k, _ = overlap.shape
        ov = overlap.astype(np.float64).copy()
        perm = np.full((n, k), -1, dtype=np.int64)
        index = np.arange(n)
        for _ in range(k):
            flat = ov.reshape(n, -1).argmax(axis=1)
            i, j = flat // k, flat % k
            perm[index, i] = j
            ov[index, i, :] = -1.0
            ov[index, :, j] = -1.0
        return perm

    if rank_blocks > 1:
        per_block = num_ranks // rank_blocks
        block_perm = match(np.einsum("lae,lbe->lab", membership(new, rank_blocks), membership(old, rank_blocks)))
        # Move whole new blocks to their matched old block position.
        blocks = new.reshape(rows, rank_blocks, per_block, slots_per_rank)
        moved = np.empty_like(blocks)
        moved[np.arange(rows)[:, None], block_perm] = blocks
        new = moved.reshape(rows, num_ranks, slots_per_rank)
        # Then ranks within each block.
        nb = membership(new, num_ranks).reshape(rows * rank_blocks, per_block, num_experts)
        ob = membership(old, num_ranks).reshape(rows * rank_blocks, per_block, num_experts)
        perm = match(np.einsum("lae,lbe->lab", nb, ob)).reshape(rows, rank_blocks, per_block)
        perm = (perm + (np.arange(rank_blocks) * per_block)[None, :, None]).reshape(rows, num_ranks)
    else:
        perm = match(np.einsum("lae,lbe->lab", membership(new, num_ranks), membership(old, num_ranks)))
    relabelled = np.empty_like(new)
    relabelled[np.arange(rows)[:, None], perm] = new
    return keep_slots(relabelled, old).reshape(rows, num_slots)


def keep_slots(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Within each rank, put experts that were already there back in their old slot.

    Args:
        new, old: int64 ``[L, R, S]``.

    Returns:
        int64 ``[L, R, S]``: each rank holds the same multiset of experts as in ``new``.
    """
    S = new.shape[-1]
    equal = new[..., :, None] == old[..., None, :]  # [L, R, S_new, S_old]
    claimed_item = np.zeros(new.shape, dtype=bool)
    claimed_pos = np.zeros(new.shape, dtype=bool)
    target = np.full(new.shape, -1, dtype=np.int64)
    for p in range(S):  # old position p goes to the first unclaimed new item equal to it
        cand = equal[..., :, p] & ~claimed_item
        has = cand.any(axis=-1)
        first = cand.argmax(axis=-1)
        layer, rank = np.nonzero(has)
        claimed_item[layer, rank, first[layer, rank]] = True
        target[layer, rank, first[layer, rank]] = p
        claimed_pos[..., p] = has
    # The other items fill the free positions in order (as many of one as of the other).
    free_pos = np.argsort(claimed_pos, axis=-1, kind="stable")
    rest_items = np.argsort(claimed_item, axis=-1, kind="stable")
    use = np.arange(S) < (~claimed_item).sum(axis=-1, keepdims=True)
    values = np.where(use, free_pos, np.take_along_axis(target, rest_items, axis=-1))
    np.put_along_axis(target, rest_items, values, axis=-1)
    out = np.empty_like(new)
    np.put_along_axis(out, target, new, axis=-1)
    return out


def _row_balancedness(phy2log: np.ndarray, weight: np.ndarray, slots_per_rank: int) -> np.ndarray:
    rows = phy2log.shape[0]
    ranks = slot_weights(phy2log, weight).reshape(rows, -1, slots_per_rank).sum(-1)
    peak = ranks.max(axis=1)
    return np.where(peak > 0, ranks.mean(axis=1) / np.where(peak > 0, peak, 1.0), 1.0)


def choose_rows(
    new: np.ndarray, previous: np.ndarray, weight: np.ndarray, slots_per_rank: int, min_gain: float, max_moves: int | None
) -> np.ndarray:
    """Per layer, the new row or the previous one: keep the previous unless the gain in
    balancedness is at least ``min_gain``; within ``max_moves`` changed slots in total, take
    layers by decreasing gain per moved slot.

    Args: new, previous int64 ``[L, P]``; weight float64 ``[L, E]``. Returns int64 ``[L, P]``.
    """
    gain = _row_balancedness(new, weight, slots_per_rank) - _row_balancedness(previous, weight, slots_per_rank)
    moves = (new != previous).sum(axis=1)
    take = (gain > 0) & (gain >= min_gain) & (moves > 0)
    if max_moves is not None:
        order = np.argsort(-(gain / np.maximum(moves, 1)), kind="stable")
        budget = max_moves
        chosen = np.zeros_like(take)
        for layer in order:
            if take[layer] and moves[layer] <= budget:
                chosen[layer] = True
                budget -= moves[layer]
        take = chosen
    return np.where(take[:, None], new, previous)


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
    """Plan a placement for ``loads [L, E]`` on ``num_ranks`` ranks (``num_nodes`` nodes) with
    ``slots_per_rank`` slots each. See the module docstring for the steps.

    Raises:
        PlanError: bad loads (shape, NaN, negative) or sizes (see ``check_inputs``).
    """
    weight = check_inputs(loads, num_ranks, num_nodes, slots_per_rank, num_groups, max_replicas, previous)
    num_layers, num_experts = weight.shape
    num_slots = num_ranks * slots_per_rank
    # Replicas on distinct ranks need cap <= R; if the budget cannot be spent that way,
    # the cap is the user's (or the smallest that fills every slot).
    cap = min(max_replicas or num_slots, num_ranks)
    if cap * num_experts < num_slots:
        cap = max_replicas or -(-num_slots // num_experts)
    hierarchical = _hierarchical(num_groups, num_nodes)
    if hierarchical:
        phy2log = plan_hierarchical(weight, num_groups, num_nodes, num_ranks, slots_per_rank, cap, options)
    else:
        phy2log = plan_rows(weight, num_ranks, slots_per_rank, cap, options)
        if options.spread_nodes and previous is None:
            phy2log = spread_nodes(phy2log, weight, num_nodes, slots_per_rank)
    if previous is not None:
        old = previous.phy2log.numpy()
        phy2log = align_to_previous(phy2log, old, slots_per_rank, num_nodes if hierarchical else 1)
        phy2log = choose_rows(phy2log, old, weight, slots_per_rank, options.min_gain, options.max_moves)
    return Placement(
        num_layers=num_layers,
        num_logical_experts=num_experts,
        num_ranks=num_ranks,
        num_nodes=num_nodes,
        slots_per_rank=slots_per_rank,
        phy2log=torch.from_numpy(np.ascontiguousarray(phy2log, dtype=np.int64)),
    )
