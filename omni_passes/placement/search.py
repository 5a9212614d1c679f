"""Local search over placement rows (ours): swaps between heavy and light ranks.

LPT packing with a fixed number of slots per rank leaves its last, smallest items no choice;
swapping a slot of a heavy rank with a slot of a light rank, when that lowers the heavier of
the two, repairs exactly that. ``refine_swaps`` runs two phases: first the R/8 heaviest ranks
swap at once, each with its own share of the lighter half, then the heaviest rank tries every
other rank, until no swap helps. The same search repairs a running placement under new loads
(``omni_passes.placement.migration.repair``).

The load a slot carries is its expert's load split evenly over the expert's replicas
(``slot_weights``), the model of ``omni::expert_dispatch``; ``row_balancedness`` is the metric
of ``omni_passes.placement.metrics`` (mean / max rank load) per row.

All functions are pure: numpy arrays in, new arrays out. A row ``[P]`` is one MoE layer's
phy2log (slot ``j`` on rank ``j // S``); ``B`` rows are planned at once.
"""

from __future__ import annotations

import numpy as np


def slot_weights(phy2log: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """float64 ``[B, P]``: the load each slot carries (expert load / its replica count)."""
    rows, num_experts = weight.shape
    counts = np.zeros((rows, num_experts))
    np.add.at(counts, (np.arange(rows)[:, None], phy2log), 1.0)
    return np.take_along_axis(weight / np.maximum(counts, 1.0), phy2log, axis=1)


def row_balancedness(phy2log: np.ndarray, weight: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """float64 ``[B]``: mean / max rank load of each row (1 for an all-zero row)."""
    rows = phy2log.shape[0]
    ranks = slot_weights(phy2log, weight).reshape(rows, -1, slots_per_rank).sum(-1)
    peak = ranks.max(axis=1)
    return np.where(peak > 0, ranks.mean(axis=1) / np.where(peak > 0, peak, 1.0), 1.0)


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
