"""Migration awareness (ours): a new plan that keeps what already sits in place.

While serving, every changed slot is an expert-weight copy, so a re-plan from the placement
in use weighs balance against moves. Two candidates per layer: the previous row repaired by a
few rounds of swaps under the new loads (``repair``; each swap moves two slots), and the fresh
plan with its ranks relabelled to keep as many experts where they are (greedy max-overlap
matching, within nodes in the hierarchical mode) and experts that stay on a rank in their old
slot (``align_to_previous``). ``choose_rows`` keeps the previous row unless a candidate gains
``min_gain`` in balancedness, prefers the candidate moving fewer slots when gains are within
``min_gain``, and with ``max_moves`` keeps the total number of changed slots within budget
(best gain per moved slot first).

All functions are pure: numpy arrays in, new arrays out; rows ``[L, P]`` are phy2log of the
MoE layers, slot ``j`` on rank ``j // S``.
"""

from __future__ import annotations

import numpy as np

from omni_passes.placement.search import refine_swaps, row_balancedness


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
    base = row_balancedness(previous, weight, slots_per_rank)
    gains = np.stack([row_balancedness(c, weight, slots_per_rank) - base for c in candidates])  # [C, L]
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


def repair(previous: np.ndarray, weight: np.ndarray, slots_per_rank: int, rank_blocks: int = 1, rounds: int = 4) -> np.ndarray:
    """The previous placement improved by swaps under new loads: few moved slots.

    With ``rank_blocks`` > 1 (hierarchical) swaps stay within a block of ranks (a node);
    ``rounds`` per phase of ``refine_swaps`` (each swap moves two slots).

    Args: previous int64 ``[L, P]``; weight float64 ``[L, E]``. Returns int64 ``[L, P]``.
    """
    rows, num_slots = previous.shape
    if rank_blocks <= 1:
        return refine_swaps(previous, weight, slots_per_rank, rounds)
    blocks = previous.reshape(rows * rank_blocks, num_slots // rank_blocks)
    fixed = refine_swaps(blocks, np.repeat(weight, rank_blocks, axis=0), slots_per_rank, rounds)
    return fixed.reshape(rows, num_slots)
