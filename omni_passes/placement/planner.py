"""OmniPlacement planner: expert loads → redundant-expert placement that balances ranks.

Given loads ``[L, E]`` (tokens per logical expert and MoE layer) and a cluster of ``R``
ranks on ``N`` nodes with ``S`` slots each (``R * S >= E``; the surplus is the redundancy
budget), choose for every layer which logical expert each of the ``R * S`` slots holds so
that the most loaded rank carries as little as possible. The metric is
``omni_passes.placement.metrics`` (a logical expert's tokens split evenly over its replicas).

Pipeline, per layer but vectorised over layers (one numpy step handles all rows at once):

0. ``forecast_loads`` - for a per-step series ``[T, L, E]``: an exponentially weighted mean
   whose half-life is picked by backtesting on the newest steps (ours; EPLB plans on the
   window sum). Drifting hot spots make recent steps the better predictor.
1. ``replica_counts`` - greedy: give the next spare slot to the expert with the largest
   per-replica load (``load / replicas``), never beyond the cap (``--max-replicas`` and, so
   replicas sit on distinct ranks, ``R``). As in EPLB and OmniInfer.
2. ``pack_lpt`` - longest processing time first: replicas by decreasing per-replica load,
   each onto the least loaded rank that has a free slot and no copy of that expert yet
   (OmniInfer; EPLB does not forbid two copies on one rank, which wastes the copy).
3. ``refine_swaps`` - local search (ours): swap a slot of a heavy rank with a slot of a light
   rank when that lowers the heavier of the two. First the R/8 heaviest ranks swap at once,
   each with its own share of the lighter half, then the heaviest rank tries every other
   rank, until no swap helps. LPT with a fixed number of slots per rank leaves the last,
   smallest items no choice; the swaps repair exactly that.
4. ``spread_nodes`` - rank order only: deal ranks to nodes heaviest first onto the lightest
   node, so hot ranks do not share a host's network (OmniInfer). The metric is unchanged.

Hierarchical mode (``num_groups`` > 1 and divisible by ``num_nodes`` > 1, as EPLB): the
expert groups of DeepSeek's group-limited routing are packed onto nodes first (the same LPT
and swaps, with groups as items), then each node solves steps 1-3 for its own experts on its
own ranks, so a token's groups still bound the nodes it visits. Otherwise planning is global.

Migration awareness (``previous`` given, ours): two candidates per layer, the previous row
repaired by a few rounds of swaps under the new loads (``repair``; each swap moves two
slots), and the fresh plan with its ranks relabelled to keep as many experts where they are
(greedy max-overlap matching, within nodes in the hierarchical mode) and experts that stay
on a rank in their old slot (``align_to_previous``). ``choose_rows`` keeps the previous row
unless a candidate gains ``min_gain`` in balancedness, prefers the candidate moving fewer
slots when gains are within ``min_gain``, and with ``max_moves`` keeps the total number of
changed slots within budget (best gain per moved slot first).

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


# ---------------------------------------------------------------------------------------------
# Step 0: from a per-step series, the load to plan for

HALF_LIVES: tuple[float | None, ...] = (2.0, 5.0, 10.0, 20.0, 50.0, None)


def _ema_weights(steps: int, half_life: float | None) -> np.ndarray:
    """float64 ``[steps]`` summing to 1, newest last; ``None`` = uniform."""
    if half_life is None:
        return np.full(steps, 1.0 / steps)
    w = 0.5 ** ((steps - 1 - np.arange(steps)) / half_life)
    return w / w.sum()


def forecast_loads(
    series: np.ndarray, half_lives: tuple[float | None, ...] = HALF_LIVES, holdout: int | None = None
) -> tuple[np.ndarray, float | None]:
    """Load to plan for, from per-step loads: an exponentially weighted mean whose half-life
    (in steps) is the one that best predicts the newest ``holdout`` steps from the steps
    before them (a backtest; L1 error over all layers and experts).

    Drifting hot spots favour short half-lives, noisy stable loads long ones (``None`` is the
    plain mean, i.e. the window sum that EPLB plans on). One matrix product per pass.

    Args:
        series: float ``[T, L, E]`` loads per step, oldest first.
        holdout: steps held out for the backtest (default ``max(1, T // 5)``).

    Returns:
        (float64 ``[L, E]`` forecast scaled to ``T`` steps, i.e. in window-sum units; the
        half-life chosen). With fewer than 3 steps: the plain sum and ``None``.
    """
    steps = series.shape[0]
    flat = series.reshape(steps, -1).astype(np.float32)
    if steps < 3 or len(half_lives) == 1:
        chosen = half_lives[0] if len(half_lives) == 1 and steps >= 1 else None
        weights = _ema_weights(steps, chosen).astype(np.float32)
        return (weights @ flat).astype(np.float64).reshape(series.shape[1:]) * steps, chosen
    holdout = holdout or max(1, steps // 5)
    fit = flat[: steps - holdout]
    target = flat[steps - holdout :].mean(axis=0)
    weights = np.stack([_ema_weights(steps - holdout, h) for h in half_lives]).astype(np.float32)  # [C, T']
    errors = np.abs(weights @ fit - target).sum(axis=1)
    chosen = half_lives[int(errors.argmin())]
    forecast = _ema_weights(steps, chosen).astype(np.float32) @ flat
    return forecast.astype(np.float64).reshape(series.shape[1:]) * steps, chosen


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


# ---------------------------------------------------------------------------------------------
# Step 3: local search


def slot_weights(phy2log: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """float64 ``[B, P]``: the load each slot carries (expert load / its replica count)."""
    rows, num_experts = weight.shape
    counts = np.zeros((rows, num_experts))
    np.add.at(counts, (np.arange(rows)[:, None], phy2log), 1.0)
    return np.take_along_axis(weight / np.maximum(counts, 1.0), phy2log, axis=1)


def _swap_round(
    x: np.ndarray,
    w: np.ndarray,
    load: np.ndarray,
    holds: np.ndarray | None,
    active: np.ndarray,
    heavy_count: int,
    partners: int,
    tol: np.ndarray,
) -> np.ndarray:
    """One round of swaps, in place, on the ``active`` rows of ``x`` (experts) and ``w`` (slot
    loads) ``[B, R, S]``, ``load [B, R]`` and ``holds`` (copies per rank and expert,
    ``[B * R * E]`` flat, None when copies may share a rank).

    The ``K = heavy_count`` most loaded ranks each get ``partners`` of the lightest ranks
    (dealt round robin, lightest first), and each applies its best swap of one of its slots
    with a slot of one of its partners if that lowers ``max(its load, partner's load)`` by
    more than ``tol``. Shares are disjoint, so all K swaps apply at once.

    Returns:
        bool ``[n, K]``: which heavy ranks of each active row swapped.
    """
    n = active.size
    _, R, S = x.shape
    K, M = heavy_count, partners
    loads = load[active]
    order = np.argsort(-loads, axis=1)
    heavy = order[:, :K]  # [n, K]
    light = order[:, R - M * K :][:, ::-1].reshape(n, M, K).transpose(0, 2, 1).reshape(n, K * M)
    rows = active[:, None]
    e_a, w_a = x[rows, heavy], w[rows, heavy]  # [n, K, S]
    load_a = loads[np.arange(n)[:, None], heavy]  # [n, K]
    e_b = x[rows, light].reshape(n, K, M * S)
    w_b = w[rows, light].reshape(n, K, M * S).astype(np.float32)
    load_b = np.repeat(loads[np.arange(n)[:, None], light], S, axis=1).reshape(n, K, M * S)
    if holds is not None:
        num_experts = holds.size // (x.shape[0] * R)
        # A heavy rank must not take an expert it holds: such b weigh +inf, so delta < 0.
        heavy_has_b = holds[(rows[..., None] * R + heavy[..., None]) * num_experts + e_b] > 0  # [n, K, M * S]
        w_b[heavy_has_b] = np.inf
    # Candidates laid out [n, K, S (slot on heavy rank), M * S (slot on a partner)]: the long
    # axis last keeps numpy's broadcasting fast. float32 to rank them, float64 to apply.
    delta = w_a.astype(np.float32)[..., :, None] - w_b[..., None, :]
    worst = np.maximum(load_a.astype(np.float32)[..., None, None] - delta, load_b.astype(np.float32)[..., None, :] + delta)
    bad = delta <= 0
    if holds is not None:
        # A partner must not take an expert it holds.
        partner_rank = light.reshape(n, K, 1, M)
        partner_has_a = holds[(rows[..., None, None] * R + partner_rank) * num_experts + e_a[..., None]] > 0  # [n, K, S, M]
        bad |= np.repeat(partner_has_a, S, axis=-1)
    np.copyto(worst, np.float32(np.inf), where=bad)
    flat = worst.reshape(n, K, S * M * S)
    best = flat.argmin(-1)
    row, i = np.nonzero(np.take_along_axis(flat, best[..., None], -1)[..., 0] < load_a - tol[:, None])
    improved = np.zeros((n, K), dtype=bool)
    if row.size == 0:
        return improved
    k = best[row, i]
    g = active[row]
    r_a = heavy[row, i]
    r_b = light.reshape(n, K, M)[row, i, (k % (M * S)) // S]
    s_a, s_b = k // (M * S), k % S
    e1, e2 = x[g, r_a, s_a], x[g, r_b, s_b]
    w1, w2 = w[g, r_a, s_a], w[g, r_b, s_b]
    ok = np.maximum(load[g, r_a] - w1 + w2, load[g, r_b] + w1 - w2) < load[g, r_a] - tol[row]
    g, row, i, r_a, r_b, s_a, s_b, e1, e2, w1, w2 = (v[ok] for v in (g, row, i, r_a, r_b, s_a, s_b, e1, e2, w1, w2))
    improved[row, i] = True
    x[g, r_a, s_a], x[g, r_b, s_b] = e2, e1
    w[g, r_a, s_a], w[g, r_b, s_b] = w2, w1
    load[g, r_a] += w2 - w1
    load[g, r_b] += w1 - w2
    if holds is not None:
        E = holds.size // (x.shape[0] * R)
        np.add.at(holds, (g * R + r_a) * E + e1, -1)
        np.add.at(holds, (g * R + r_a) * E + e2, 1)
        np.add.at(holds, (g * R + r_b) * E + e2, -1)
        np.add.at(holds, (g * R + r_b) * E + e1, 1)
    return improved


def refine_swaps(
    phy2log: np.ndarray,
    weight: np.ndarray,
    slots_per_rank: int,
    max_rounds: int = 12,
    distinct: bool = True,
    tol: float = 1e-5,
) -> np.ndarray:
    """Local search: swap slots between heavy and light ranks while that lowers the heavier.

    Two phases of at most ``max_rounds`` rounds each: first the ``R // 8`` heaviest ranks
    swap at once, each with its own share of the lighter half of the ranks (fast progress);
    then the single heaviest rank tries every other rank (the exact "max rank vs all"
    search) until a round finds nothing. A swap must lower the pair's max by more than
    ``tol`` x the row's mean rank load. Replica counts never change; with ``distinct`` no swap
    puts a second copy of an expert on a rank. Converged rows drop out of the batch.

    Args:
        phy2log: int64 ``[B, P]``; weight: float64 ``[B, E]``.

    Returns:
        a new int64 ``[B, P]``; no rank of a row ends above that row's old maximum.
    """
    rows, num_slots = phy2log.shape
    num_experts = weight.shape[1]
    R, S = num_slots // slots_per_rank, slots_per_rank
    x = phy2log.reshape(rows, R, S).copy()
    if R < 2:
        return x.reshape(rows, num_slots)
    w = slot_weights(phy2log, weight).reshape(rows, R, S)
    load = w.sum(-1)
    tolerance = tol * load.mean(axis=1)
    holds = None
    if distinct:
        flat = (np.arange(rows)[:, None, None] * R + np.arange(R)[None, :, None]) * num_experts + x
        holds = np.bincount(flat.ravel(), minlength=rows * R * num_experts).astype(np.int16)
    phases = [(R // 8, (R // 2) // (R // 8))] if R >= 16 else []
    phases.append((1, R - 1))
    for heavy_count, partners in phases:
        active = np.arange(rows)
        for _ in range(max_rounds):
            if active.size == 0:
                break
            improved = _swap_round(x, w, load, holds, active, heavy_count, partners, tolerance[active])
            active = active[improved.any(axis=1)]
    return x.reshape(rows, num_slots)


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
        phy2log = refine_swaps(phy2log, weight, slots_per_rank, options.swap_rounds, distinct)
    return phy2log


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
        node_groups = refine_swaps(node_groups, group_weight, groups_per_node, options.swap_rounds)
    # node_experts[l, n, i]: the i-th logical expert living on node n.
    node_groups = node_groups.reshape(num_layers, num_nodes, groups_per_node)
    node_experts = (node_groups[..., None] * group_size + np.arange(group_size)).reshape(num_layers, num_nodes, -1)
    sub_weight = np.take_along_axis(weight, node_experts.reshape(num_layers, -1), axis=1)
    sub_weight = sub_weight.reshape(num_layers * num_nodes, -1)
    node_cap = effective_cap(max_replicas, ranks_per_node, ranks_per_node * slots_per_rank, sub_weight.shape[1])
    local = plan_rows(sub_weight, ranks_per_node, slots_per_rank, node_cap, options)
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
    candidates: list[np.ndarray],
    previous: np.ndarray,
    weight: np.ndarray,
    slots_per_rank: int,
    min_gain: float = 0.0,
    max_moves: int | None = None,
) -> np.ndarray:
    """Per layer, one of the candidate rows or the previous row.

    A candidate counts only if it raises the layer's balancedness (under ``weight``) by at
    least ``min_gain`` (and by more than nothing). Without ``max_moves`` each layer takes, of
    the candidates within ``min_gain`` of its best gain, the one that moves fewest slots. With
    it, changed slots in total stay within the budget: options are taken by decreasing gain
    per moved slot, a layer at most once, then upgraded to a better option of the same layer
    where the remaining budget allows.

    Args:
        candidates: int64 ``[L, P]`` rows each; previous: int64 ``[L, P]``; weight ``[L, E]``.

    Returns:
        int64 ``[L, P]``.
    """
    base = _row_balancedness(previous, weight, slots_per_rank)
    gains = np.stack([_row_balancedness(c, weight, slots_per_rank) - base for c in candidates])  # [C, L]
    moves = np.stack([(c != previous).sum(axis=1) for c in candidates])  # [C, L]
    usable = (gains > 0) & (gains >= min_gain) & (moves > 0)
    num_layers = previous.shape[0]
    pick = np.full(num_layers, -1)
    if max_moves is None:
        best_gain = np.where(usable, gains, -np.inf).max(axis=0)
        near = usable & (gains >= best_gain - min_gain)
        fewest = np.where(near, moves, np.iinfo(np.int64).max).argmin(axis=0)
        has = near.any(axis=0)
        pick[has] = fewest[has]
    else:
        budget = int(max_moves)
        ratio = np.where(usable, gains / np.maximum(moves, 1), -np.inf)
        for flat in np.argsort(-ratio, axis=None, kind="stable"):
            c, layer = divmod(int(flat), num_layers)
            if not usable[c, layer]:
                break
            if pick[layer] < 0 and moves[c, layer] <= budget:
                pick[layer] = c
                budget -= int(moves[c, layer])
        for layer in np.argsort(-gains.max(axis=0), kind="stable"):  # upgrades, best first
            now = pick[layer]
            spent = moves[now, layer] if now >= 0 else 0
            gain_now = gains[now, layer] if now >= 0 else 0.0
            for c in np.argsort(-gains[:, layer], kind="stable"):
                extra = int(moves[c, layer] - spent)
                if usable[c, layer] and gains[c, layer] > gain_now and extra <= budget:
                    pick[layer] = c
                    budget -= extra
                    break
    out = previous.copy()
    for c, candidate in enumerate(candidates):
        rows = pick == c
        out[rows] = candidate[rows]
    return out


def repair(previous: np.ndarray, weight: np.ndarray, slots_per_rank: int, rank_blocks: int = 1, options: PlanOptions = PlanOptions()) -> np.ndarray:
    """The previous placement improved by swaps under new loads: few moved slots.

    With ``rank_blocks`` > 1 (hierarchical) swaps stay within a block of ranks (a node).

    Args: previous int64 ``[L, P]``; weight float64 ``[L, E]``. Returns int64 ``[L, P]``.
    """
    rows, num_slots = previous.shape
    if rank_blocks <= 1:
        return refine_swaps(previous, weight, slots_per_rank, options.repair_rounds)
    blocks = previous.reshape(rows * rank_blocks, num_slots // rank_blocks)
    fixed = refine_swaps(blocks, np.repeat(weight, rank_blocks, axis=0), slots_per_rank, options.repair_rounds)
    return fixed.reshape(rows, num_slots)


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
        phy2log = plan_hierarchical(weight, num_groups, num_nodes, num_ranks, slots_per_rank, max_replicas, options)
    else:
        cap = effective_cap(max_replicas, num_ranks, num_slots, num_experts)
        phy2log = plan_rows(weight, num_ranks, slots_per_rank, cap, options)
        if options.spread_nodes and previous is None:
            phy2log = spread_nodes(phy2log, weight, num_nodes, slots_per_rank)
    # Safety net: a layer never ends worse than the identity (only odd budgets ever need it;
    # skipped when the identity itself breaks the replica cap).
    base = baseline_rows(num_layers, num_experts, num_ranks, num_nodes, slots_per_rank, num_groups)
    if max_replicas is None or -(-num_slots // num_experts) <= max_replicas:
        worse = _row_balancedness(base, weight, slots_per_rank) > _row_balancedness(phy2log, weight, slots_per_rank)
        phy2log = np.where(worse[:, None], base, phy2log)
    if previous is not None:
        old = previous.phy2log.numpy()
        blocks = num_nodes if hierarchical else 1
        fresh = align_to_previous(phy2log, old, slots_per_rank, blocks)
        repaired = repair(old, weight, slots_per_rank, blocks, options)
        phy2log = choose_rows([repaired, fresh], old, weight, slots_per_rank, options.min_gain, options.max_moves)
    return Placement(
        num_layers=num_layers,
        num_logical_experts=num_experts,
        num_ranks=num_ranks,
        num_nodes=num_nodes,
        slots_per_rank=slots_per_rank,
        phy2log=torch.from_numpy(np.ascontiguousarray(phy2log, dtype=np.int64)),
    )
