"""Form 2: the math decomposition (transformers DeepSeek on CPU: its q/k head dim, nope +
rope, is not v_head_dim, so SDPA falls back to the math path and Inductor decomposes it)::

    Q ─► [mul c1] ─► expand ─► reshape [B*H, Sq, D] ───────┐
    K ─► permute(0,1,3,2) ─► [mul c2] ─► expand ─► reshape ─┴► bmm ─► reshape [B,H,Sq,Sk]
       ─► [mul/div c3] ─► add(mask) ─► softmax (amax, sub, exp, sum, div [, safe-softmax where])
       ─► expand ─► reshape [B*H, Sq, Sk] ─┐
    V ─► expand ─► clone ─► reshape ───────┴► bmm ─► [B*H, Sq, Dv]

Every node between the softmax input and the probabilities must be a softmax op reducing
over the last dim, and the probabilities must feed nothing but the second bmm, or the site is
rejected with a reason (it would not be plain softmax attention). The match starts from the
second bmm and walks back.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from omni_passes.fx.attention.operands import (
    VIEW_OPS,
    Operand,
    dtype_of,
    permutation,
    shape_of,
    site_layer,
    strip_scalar_scale,
    strip_views,
)
from omni_passes.fx.attention.sites import DenseAttention
from omni_passes.fx.utils import is_op, target_name

# Ops a decomposed (safe) softmax is made of.
SOFTMAX_OPS = (
    "aten.amax", "aten.sub", "aten.exp", "aten.sum", "aten.div", "aten.eq", "aten.logical_not",
    "aten.any", "aten.where", "aten.full", "prims.convert_element_type", "aten._softmax",
    "aten._safe_softmax", "aten.mul", "aten.reciprocal",
)
REDUCTIONS = ("aten.amax", "aten.sum", "aten.any")
# What the last op of a softmax is: normalise (div, mul by reciprocal), the safe-softmax where.
PROBS_OPS = ("aten.div", "aten.where", "aten.mul", "aten._softmax", "aten._safe_softmax")
# How far back from the probabilities a softmax's amax may sit (amax ─► sub ─► exp ─► div ─► where).
SOFTMAX_DEPTH = 10


def softmax_input(probs: fx.Node) -> fx.Node | None:
    """The tensor a (possibly decomposed) softmax producing ``probs`` normalises."""
    node = probs
    while is_op(node, "prims.convert_element_type"):
        node = node.args[0]
    if is_op(node, "aten._softmax", "aten._safe_softmax"):
        return node.args[0]
    frontier, seen = [probs], set()
    for _ in range(SOFTMAX_DEPTH):
        nxt = []
        for current in frontier:
            for parent in current.all_input_nodes:
                if parent in seen:
                    continue
                seen.add(parent)
                if is_op(parent, "aten.amax"):
                    return parent.args[0]
                if is_op(parent, *SOFTMAX_OPS):
                    nxt.append(parent)
        frontier = nxt
    return None


def softmax_region_problem(scores: fx.Node, probs: fx.Node) -> str | None:
    """Every node on a path scores ─► probs must be a softmax op over the last dim, and may
    feed nothing outside that region (else it is not plain softmax attention). None: fine."""
    down: set[fx.Node] = set()
    stack = [scores]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in down and user is not probs and is_op(user, *SOFTMAX_OPS):
                down.add(user)
                stack.append(user)
    # Region = descendants of scores (within softmax ops) that reach probs.
    up: set[fx.Node] = set()
    stack = [probs]
    while stack:
        node = stack.pop()
        for parent in node.all_input_nodes:
            if parent in down and parent not in up:
                up.add(parent)
                stack.append(parent)
    region = up | {probs}
    for user in scores.users:
        if user not in region:
            return f"scores feed {target_name(user)} outside the softmax"
    for node in up:
        if not is_op(node, *SOFTMAX_OPS):
            return f"{target_name(node)} inside the softmax"
        if is_op(node, *REDUCTIONS):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            rank = len(shape_of(scores) or ())
            dims = dims if isinstance(dims, (list, tuple)) else [dims]
            if [d % rank if isinstance(d, int) and rank else d for d in dims] != [rank - 1]:
                return f"{target_name(node)} over dims {dims}, not the key dim"
        for user in node.users:
            if user not in region:
                return f"softmax intermediate {node.name} also feeds {target_name(user)}"
    return None


def peel(node: fx.Node, shape4: tuple, transpose: bool) -> tuple[Operand, float]:
    """Best 4-D source for a bmm operand ``node`` ([B*H, S, D], or [B*H, D, S] when
    ``transpose``), and the scalar factor peeled off it.

    Prefers the un-expanded, unscaled tensor (so GQA/MLA keys are not copied per head and the
    scale folds into the op); falls back to reshaping the bmm operand itself.
    """
    base = strip_views(node)
    base, factor = strip_scalar_scale(base)
    base_shape = shape_of(base)
    B, H = shape4[0], shape4[1]
    want = (shape4[2], shape4[3])  # (S, D) of the operand as attention wants it
    if base_shape and len(base_shape) == 4 and base_shape[0] == B and base_shape[1] and H % base_shape[1] == 0:
        if not transpose and base_shape[2:] == want:
            return Operand(base, base_shape), factor
        if transpose and permutation(base) == [0, 1, 3, 2]:
            inner = base.args[0]
            inner_shape = shape_of(inner)
            if inner_shape and inner_shape[:2] == base_shape[:2] and inner_shape[2:] == want:
                return Operand(inner, inner_shape), factor
        if transpose and base_shape[2:] == (want[1], want[0]):
            return Operand(base, (*base_shape[:2], *want), transpose=True), factor
    return Operand(node, shape4, transpose=transpose), 1.0


def match_bmm_softmax(second_bmm: fx.Node) -> DenseAttention | str | None:
    """The site whose output is ``second_bmm``. ``None``: not attention at all; ``str``:
    attention-like but rejected (the reason)."""
    probs = strip_views(second_bmm.args[0])
    if not isinstance(probs, fx.Node):
        return None
    producer = probs.args[0] if is_op(probs, "prims.convert_element_type") else probs
    if not is_op(producer, *PROBS_OPS):
        return None  # the first bmm of a pair, or any other matmul
    scores_in = softmax_input(probs)
    if scores_in is None:
        return None
    # scores_in = [add(scaled, mask)] where scaled = c * reshape(bmm(A, B)).
    mask = None
    candidates = [scores_in]
    if is_op(scores_in, "aten.add") and all(isinstance(a, fx.Node) for a in scores_in.args[:2]):
        candidates = list(scores_in.args[:2])
    first_bmm = post_scale = scaled = None
    for cand in candidates:
        inner, factor = strip_scalar_scale(cand)
        inner = strip_views(inner)
        if is_op(inner, "aten.bmm"):
            first_bmm, post_scale, scaled = inner, factor, cand
            break
    if first_bmm is None:
        return None
    if scaled is not scores_in:
        mask = next(a for a in scores_in.args[:2] if a is not scaled)
    layer = site_layer(second_bmm, first_bmm)
    problem = softmax_region_problem(scores_in, probs)
    if problem:
        return f"attention-like bmm ─► softmax ─► bmm but {problem}"
    prob_users = [u for u in probs.users]
    chain_ok = all(strip_views(u) is probs or is_op(u, *VIEW_OPS) for u in prob_users)
    if not chain_ok or len(prob_users) != 1:
        return "attention probabilities are used elsewhere (e.g. returned as attention weights)"
    scores4 = shape_of(scores_in)
    a_shape, b_shape, v3 = shape_of(first_bmm.args[0]), shape_of(first_bmm.args[1]), shape_of(second_bmm.args[1])
    if not scores4 or len(scores4) != 4 or not a_shape or not b_shape or not v3:
        return "attention scores are not [B, H, Sq, Sk] with known shapes"
    B, H, Sq, Sk = scores4
    D, Dv = a_shape[-1], v3[-1]
    if mask is not None:
        mshape = shape_of(mask)
        if mshape is None or len(mshape) > 4 or tuple(mshape[-2:]) not in ((Sq, Sk), (1, Sk), (Sq, 1), (1, 1)):
            return f"mask of shape {mshape} does not broadcast to the scores [B, H, {Sq}, {Sk}]"
    q, q_factor = peel(first_bmm.args[0], (B, H, Sq, D), transpose=False)
    k, k_factor = peel(first_bmm.args[1], (B, H, Sk, D), transpose=True)
    v, _ = peel(second_bmm.args[1], (B, H, Sk, Dv), transpose=False)
    if k.shape[1] != v.shape[1]:  # mixed peeling: rebuild both from the bmm operands
        k = Operand(first_bmm.args[1], (B, H, Sk, D), transpose=True)
        v = Operand(second_bmm.args[1], (B, H, Sk, Dv))
        k_factor = 1.0
    return DenseAttention(
        form="math", layer=layer, output=second_bmm, output_is_3d=True, q=q, k=k, v=v,
        scale=post_scale * q_factor * k_factor, mask=mask,
        mask_is_bool=dtype_of(mask) == torch.bool if mask is not None else False,
        is_causal=False, anchor=second_bmm,
    )
