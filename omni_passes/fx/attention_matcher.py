"""Find attention in aten-level post-grad graphs and recover its operands.

Three forms are recognised, by data flow and op schema (not by model names):

1. **SDPA nodes** (transformers on CUDA, or on CPU when q/k and v head dims agree)::

       q, k, v, mask ─► aten._scaled_dot_product_{cudnn,efficient,flash,flash_for_cpu}_attention
                        ─► getitem[0]  [B, Hq, Sq, Dv]

2. **Math decomposition** (transformers DeepSeek on CPU: its q/k head dim, nope + rope, is
   not v_head_dim, so SDPA falls back to the math path and Inductor decomposes it)::

       Q ─► [mul c1] ─► expand ─► reshape [B*H, Sq, D] ───────┐
       K ─► permute(0,1,3,2) ─► [mul c2] ─► expand ─► reshape ─┴► bmm ─► reshape [B,H,Sq,Sk]
          ─► [mul/div c3] ─► add(mask) ─► softmax (amax, sub, exp, sum, div [, safe-softmax where])
          ─► expand ─► reshape [B*H, Sq, Sk] ─┐
       V ─► expand ─► clone ─► reshape ───────┴► bmm ─► [B*H, Sq, Dv]

   Every node between the softmax input and the probabilities must be a softmax op reducing
   over the last dim, and the probabilities must feed nothing but the second bmm, or the site
   is rejected with a reason (it would not be plain softmax attention).

3. **vLLM MLA** (vLLM on CPU): ``auto_functionalized(vllm.unified_mla_attention_with_output,
   q=, kv_c_normed=, k_pe=, output=, layer_name=, ...)``; the layer is named by the
   ``layer_name`` graph input (``meta["val"].real_obj.value == "model.layers.N.self_attn.attn"``)
   or a string constant.

The matcher only reads the graph. What it returns says how to rebuild 4-D q, k, v
(``Operand``), the softmax scale and the mask node; ``omni_passes.fx.sparse_attention`` does
the rewrite.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from omni_passes.fx.utils import functionalized_op, is_op, layer_index, target_name
from omni_passes.layer_names import decoder_layer_index

SDPA_OPS = (
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten.scaled_dot_product_attention",
)
VLLM_MLA_OP = "vllm.unified_mla_attention_with_output"
VLLM_MHA_OPS = ("vllm.unified_attention_with_output", "vllm.unified_attention")

# Ops that only move or copy data: followed when peeling operands back to their 4-D source.
VIEW_OPS = ("aten.reshape", "aten.view", "aten._unsafe_view", "aten.expand", "aten.clone", "aten.contiguous")
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



@dataclass
class Operand:
    """How to get a 4-D attention operand from the graph.

    ``node`` is taken as is when its value already has ``shape`` ([B, H, S, D]); otherwise it
    is reshaped to ``shape`` (it then holds the [B*H, S, D] bmm operand). With ``transpose``
    the last two dims are swapped after that (keys seen as K^T by the first bmm).
    """

    node: fx.Node
    shape: tuple
    transpose: bool = False


@dataclass
class DenseAttention:
    """One softmax attention of a transformers graph (SDPA node or math decomposition)."""

    form: str                       # "sdpa" (op name in `op`) or "math"
    layer: int | None
    output: fx.Node                 # its uses get the new attention output
    output_is_3d: bool              # math: output is the second bmm, [B*H, Sq, Dv]
    q: Operand
    k: Operand
    v: Operand
    scale: float
    mask: fx.Node | None            # bool, or additive float (0 where allowed)
    mask_is_bool: bool
    is_causal: bool
    op: str = ""
    anchor: fx.Node | None = None   # the node whose module stack / position the new op takes

    @property
    def batch_heads(self) -> tuple:
        return self.q.shape[0], self.q.shape[1]


@dataclass
class VllmMlaAttention:
    node: fx.Node                   # auto_functionalized(vllm.unified_mla_attention_with_output)
    layer: int | None
    layer_name: str | None
    kwargs: dict[str, Any]


@dataclass
class AttentionMatch:
    dense: list[DenseAttention] = field(default_factory=list)
    vllm_mla: list[VllmMlaAttention] = field(default_factory=list)
    rejected: list[tuple[int | None, str, fx.Node]] = field(default_factory=list)  # (layer, reason, node)


# --------------------------------------------------------------------------- small helpers
def shape_of(node: Any) -> tuple | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def dtype_of(node: Any) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def permutation(node: Any) -> list[int] | None:
    """The dim order a ``permute`` / ``transpose`` / ``t`` node applies (None for other nodes):
    post-grad graphs say permute, traced ones (make_fx, torchair) may say transpose."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    rank = len(shape_of(node) or ())
    if is_op(node, "aten.permute"):
        return [d % rank for d in node.args[1]] if rank else None
    if is_op(node, "aten.transpose") and rank:
        order = list(range(rank))
        a, b = node.args[1] % rank, node.args[2] % rank
        order[a], order[b] = order[b], order[a]
        return order
    if is_op(node, "aten.t"):
        return [1, 0] if rank == 2 else [0]
    return None


def bind_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an OpOverload call by schema name, defaults filled in."""
    schema = node.target._schema
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def _scalar(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _strip_views(node: fx.Node) -> fx.Node:
    while isinstance(node, fx.Node) and is_op(node, *VIEW_OPS):
        node = node.args[0]
    return node


def _strip_scalar_scale(node: fx.Node) -> tuple[fx.Node, float]:
    """mul(x, c) / div(x, c) with a Python scalar c, repeatedly: (x, product of factors)."""
    factor = 1.0
    while isinstance(node, fx.Node):
        if is_op(node, "aten.mul") and _scalar(node.args[1]) is not None and isinstance(node.args[0], fx.Node):
            factor *= _scalar(node.args[1])
            node = node.args[0]
        elif is_op(node, "aten.mul") and _scalar(node.args[0]) is not None and isinstance(node.args[1], fx.Node):
            factor *= _scalar(node.args[0])
            node = node.args[1]
        elif is_op(node, "aten.div") and _scalar(node.args[1]) not in (None, 0.0):
            factor /= _scalar(node.args[1])
            node = node.args[0]
        else:
            break
    return node, factor


def _site_layer(*nodes: fx.Node) -> int | None:
    for node in nodes:
        layer = layer_index(node)
        if layer is not None:
            return layer
    return None


# --------------------------------------------------------------------------- masks
def is_pure_mask(mask: fx.Node, max_hops: int = 8) -> bool:
    """True when an additive float mask is ``where(cond, 0, c)`` with c <= -1e4 or -inf,
    seen through views/slices/casts: then ``mask == 0`` is exactly "attend". A general float
    bias (ALiBi, relative positions) is not a mask the sparse op can reproduce."""
    node = mask
    for _ in range(max_hops):
        if not isinstance(node, fx.Node):
            return False
        if dtype_of(node) == torch.bool:
            return True
        if is_op(node, "aten.where"):
            allowed, blocked = node.args[1], node.args[2]
            allowed_value = _const_value(allowed)
            blocked_value = _const_value(blocked)
            return allowed_value == 0.0 and blocked_value is not None and blocked_value <= -1e4
        if is_op(node, *VIEW_OPS, "aten.slice", "aten.unsqueeze", "aten.squeeze", "aten.select",
                 "prims.convert_element_type", "aten._to_copy"):
            node = node.args[0]
            continue
        # SDPA's memory-efficient kernel pads a bias to a multiple of 16 keys (then slices it
        # back): padding with 0 keeps the values in {0, blocked}.
        if is_op(node, "aten.constant_pad_nd") and _const_value(node.args[2] if len(node.args) > 2 else 0.0) == 0.0:
            node = node.args[0]
            continue
        return False
    return False


def mask_is_where_of_bool(mask: Any) -> bool:
    """``where(cond, 0, c)`` with a bool ``cond`` of the mask's own shape and c <= -1e4."""
    if not (isinstance(mask, fx.Node) and is_op(mask, "aten.where")):
        return False
    cond = mask.args[0]
    blocked = _const_value(mask.args[2])
    return (dtype_of(cond) == torch.bool and shape_of(cond) == shape_of(mask)
            and _const_value(mask.args[1]) == 0.0 and blocked is not None and blocked <= -1e4)


def _const_value(arg: Any) -> float | None:
    """A scalar constant: a Python number or an ``aten.full([], value)`` node."""
    if _scalar(arg) is not None:
        return _scalar(arg)
    if isinstance(arg, fx.Node) and is_op(arg, "aten.full") and _scalar(arg.args[1]) is not None:
        return _scalar(arg.args[1])
    if isinstance(arg, fx.Node) and is_op(arg, "aten.scalar_tensor") and _scalar(arg.args[0]) is not None:
        return _scalar(arg.args[0])
    return None


# --------------------------------------------------------------------------- SDPA nodes
def _match_sdpa(node: fx.Node) -> DenseAttention | str:
    args = bind_args(node)
    op = target_name(node).rsplit(".", 1)[0]
    q, k, v = args["query"], args["key"], args["value"]
    qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
    if not (qs and ks and vs) or len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return f"{op}: q/k/v are not 4-D tensors with known shapes"
    dropout = args.get("dropout_p") or 0.0
    if dropout:
        return f"{op}: dropout_p={dropout} (training graph); the sparse op has no dropout"
    if ks[1] != vs[1] or qs[1] % ks[1] != 0:
        return f"{op}: head counts q {qs[1]}, k {ks[1]}, v {vs[1]} are not MHA/GQA"
    # Outputs other than the attention output (log-sum-exp, RNG state) must be unused.
    if node.target is torch.ops.aten.scaled_dot_product_attention.default:
        output = node
    else:
        output = None
        for user in node.users:
            if user.target is operator.getitem and user.args[1] == 0:
                output = user
            elif user.target is operator.getitem and user.users:
                return f"{op}: output #{user.args[1]} (log-sum-exp / RNG state) is used, e.g. by a backward pass"
        if output is None:
            return f"{op}: attention output is unused"
    mask = args.get("attn_mask", args.get("attn_bias"))
    scale = args.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(qs[-1])
    return DenseAttention(
        form="sdpa", op=op, layer=layer_index(node), output=output, output_is_3d=False,
        q=Operand(q, qs), k=Operand(k, ks), v=Operand(v, vs), scale=float(scale), mask=mask,
        mask_is_bool=dtype_of(mask) == torch.bool if mask is not None else False,
        is_causal=bool(args.get("is_causal")), anchor=node,
    )


# --------------------------------------------------------------------------- math form
def _softmax_input(probs: fx.Node) -> fx.Node | None:
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


def _check_softmax_region(scores: fx.Node, probs: fx.Node) -> str | None:
    """Every node on a path scores ─► probs must be a softmax op over the last dim, and may
    feed nothing outside that region (else it is not plain softmax attention)."""
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


def _peel(node: fx.Node, shape4: tuple, transpose: bool) -> tuple[Operand, float]:
    """Best 4-D source for a bmm operand ``node`` ([B*H, S, D], or [B*H, D, S] when
    ``transpose``), and the scalar factor peeled off it.

    Prefers the un-expanded, unscaled tensor (so GQA/MLA keys are not copied per head and the
    scale folds into the op); falls back to reshaping the bmm operand itself.
    """
    base = _strip_views(node)
    base, factor = _strip_scalar_scale(base)
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


def _match_math(second_bmm: fx.Node) -> DenseAttention | str | None:
    """``None``: not attention at all; ``str``: attention-like but rejected (the reason)."""
    probs = _strip_views(second_bmm.args[0])
    if not isinstance(probs, fx.Node):
        return None
    producer = probs.args[0] if is_op(probs, "prims.convert_element_type") else probs
    if not is_op(producer, *PROBS_OPS):
        return None  # the first bmm of a pair, or any other matmul
    scores_in = _softmax_input(probs)
    if scores_in is None:
        return None
    # scores_in = [add(scaled, mask)] where scaled = c * reshape(bmm(A, B)).
    mask = None
    candidates = [scores_in]
    if is_op(scores_in, "aten.add") and all(isinstance(a, fx.Node) for a in scores_in.args[:2]):
        candidates = list(scores_in.args[:2])
    first_bmm = post_scale = scaled = None
    for cand in candidates:
        inner, factor = _strip_scalar_scale(cand)
        inner = _strip_views(inner)
        if is_op(inner, "aten.bmm"):
            first_bmm, post_scale, scaled = inner, factor, cand
            break
    if first_bmm is None:
        return None
    if scaled is not scores_in:
        mask = next(a for a in scores_in.args[:2] if a is not scaled)
    layer = _site_layer(second_bmm, first_bmm)
    problem = _check_softmax_region(scores_in, probs)
    if problem:
        return f"attention-like bmm ─► softmax ─► bmm but {problem}"
    prob_users = [u for u in probs.users]
    chain_ok = all(_strip_views(u) is probs or is_op(u, *VIEW_OPS) for u in prob_users)
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
    q, q_factor = _peel(first_bmm.args[0], (B, H, Sq, D), transpose=False)
    k, k_factor = _peel(first_bmm.args[1], (B, H, Sk, D), transpose=True)
    v, _ = _peel(second_bmm.args[1], (B, H, Sk, Dv), transpose=False)
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


# --------------------------------------------------------------------------- vLLM
def vllm_layer_name(arg: Any) -> str | None:
    """The layer name vLLM passes its attention op: a string, or a graph input whose fake
    value wraps vLLM's opaque LayerName object."""
    if isinstance(arg, str):
        return arg
    if isinstance(arg, fx.Node):
        value = arg.meta.get("val")
        for attr in ("real_obj", "wrapped_obj"):
            obj = getattr(value, attr, None)
            name = getattr(obj, "value", None)
            if isinstance(name, str):
                return name
    return None


def _match_vllm(node: fx.Node) -> VllmMlaAttention:
    kwargs = dict(node.kwargs)
    name = vllm_layer_name(kwargs.get("layer_name"))
    layer = None
    if name:
        layer = decoder_layer_index(name)
    if layer is None:
        layer = layer_index(node)
    return VllmMlaAttention(node=node, layer=layer, layer_name=name, kwargs=kwargs)


# --------------------------------------------------------------------------- entry point
def find_attention(graph: fx.Graph) -> AttentionMatch:
    match = AttentionMatch()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        inner = functionalized_op(node)
        if inner is not None:
            if inner.startswith(VLLM_MLA_OP):
                match.vllm_mla.append(_match_vllm(node))
            elif any(inner.startswith(name) for name in VLLM_MHA_OPS):
                match.rejected.append((layer_index(node), f"{inner}: vLLM non-MLA attention is not supported "
                                                         "(this pass handles DeepSeek's MLA)", node))
            continue
        if is_op(node, *SDPA_OPS):
            found = _match_sdpa(node)
        elif is_op(node, "aten.bmm"):
            found = _match_math(node)
        else:
            continue
        if isinstance(found, DenseAttention):
            match.dense.append(found)
        elif isinstance(found, str):
            match.rejected.append((layer_index(node), found, node))
    return match


# --------------------------------------------------------------------------- building (shared by the attention passes)
class Emitter:
    """Inserts call_function nodes with fake values (``meta["val"]``) computed on the spot and
    the module stack of the site they replace (so drawings and layer numbering keep working)."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        from torch._guards import detect_fake_mode

        self.graph = graph
        self.anchor = anchor
        vals = [n.meta.get("val") for n in anchor.all_input_nodes]
        self.mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])

    def __call__(self, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        kwargs = kwargs or {}
        node = self.graph.call_function(target, args, kwargs)
        for key in ("nn_module_stack", "stack_trace"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        node.meta["val"] = _fake_run(target, args, kwargs, self.mode)
        return node


def _fake_run(target: Any, args: tuple, kwargs: dict, mode: Any) -> Any:
    """The op on the arguments' fake values, in the graph's fake mode."""
    values = torch.utils._pytree.tree_map(lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a, (args, kwargs))
    if mode is None:
        return None
    with mode:
        return target(*values[0], **values[1])


def operand_node(emit: Emitter, operand: Operand) -> fx.Node:
    """The 4-D [B, H, S, D] tensor an ``Operand`` describes, built before the emitter's anchor."""
    node = operand.node
    shape = tuple(operand.shape)
    if len(shape_of(node)) == 3:  # a [B*H, S, D] bmm operand: split B*H back
        sizes = [-1, shape[1]] + [sym_dim(emit, node, i, shape[i + 1]) for i in (1, 2)]
        if operand.transpose:  # the operand is [B*H, D, S]
            sizes = [-1, shape[1]] + [sym_dim(emit, node, i, shape[4 - i]) for i in (1, 2)]
        node = emit(torch.ops.aten.reshape.default, (node, sizes))
    if operand.transpose:
        node = emit(torch.ops.aten.permute.default, (node, [0, 1, 3, 2]))
    return node


def sym_dim(emit: Emitter, node: fx.Node, dim: int, size: Any) -> Any:
    """A size for an op argument: the int, or a sym_size node when it is symbolic."""
    if isinstance(size, int):
        return size
    return emit(torch.ops.aten.sym_size.int, (node, dim))


def node_device(node: fx.Node) -> torch.device:
    value = node.meta.get("val")
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def comes_before(graph: fx.Graph, a: fx.Node, b: fx.Node) -> bool:
    """``a`` comes before ``b`` in graph order (so ``b`` may use it)."""
    for node in graph.nodes:
        if node is a:
            return True
        if node is b:
            return False
    return False


class QueryPositions:
    """Query positions q_pos [B, Sq] (int64) from attention masks, one computation per mask.

    In a causal mask whose key index j holds position j, the row of the query at p allows
    exactly the keys [0, p], so p = (allowed keys) − 1. ``omni::mask_positions`` computes that
    and, with ``check``, asserts at run time that every row is such a prefix (a left-padded or
    windowed mask would otherwise make an op that takes positions compute something else).
    Layers that each turn one shared bool mask into ``where(cond, 0, -inf)`` share one q_pos.
    SDPA with ``is_causal=True`` and no mask gets 0..Sq−1 (SDPA's causal mask is top-left).
    """

    def __init__(self, graph: fx.Graph, pass_name: str, check: bool = True):
        self.graph = graph
        self.pass_name = pass_name
        self.check = check
        self._built: dict[Any, fx.Node] = {}

    def get(self, emit: Emitter, site: DenseAttention, q: fx.Node, layer: int | None) -> fx.Node:
        """q_pos for ``site`` (q: its 4-D query node), inserted at the emitter's position."""
        source = site.mask.args[0] if site.mask is not None and mask_is_where_of_bool(site.mask) else None
        key = source if source is not None else (site.mask if site.mask is not None else ("causal", shape_of(site.q.node)))
        q_pos = self._built.get(key)
        if q_pos is None or not comes_before(self.graph, q_pos, site.anchor):
            q_pos = self._build(emit, site, q, layer, source)
            self._built[key] = q_pos
        return q_pos

    def _build(self, emit: Emitter, site: DenseAttention, q: fx.Node, layer: int | None,
               source: fx.Node | None) -> fx.Node:
        import kernels.sparse_attention_positions  # noqa: F401  (registers omni::mask_positions)

        B, _, Sq, _ = site.q.shape
        if site.mask is None:
            pos = emit(torch.ops.prims.iota.default, (sym_dim(emit, q, 2, Sq),),
                       {"start": 0, "step": 1, "dtype": torch.int64, "device": node_device(q), "requires_grad": False})
            return emit(torch.ops.aten.expand.default, (emit(torch.ops.aten.unsqueeze.default, (pos, 0)), [sym_dim(emit, q, 0, B), -1]))
        if source is not None:
            allowed = source
        else:
            allowed = site.mask if site.mask_is_bool else emit(torch.ops.aten.eq.Scalar, (site.mask, 0))
        for _ in range(4 - len(shape_of(allowed))):
            allowed = emit(torch.ops.aten.unsqueeze.default, (allowed, 0))
        pos = emit(torch.ops.omni.mask_positions.default,
                   (allowed, self.check, f"omni {self.pass_name} (layer {layer} and any sharing its mask)"))  # [b, Sq]
        if shape_of(pos)[0] != B:
            pos = emit(torch.ops.aten.expand.default, (pos, [sym_dim(emit, q, 0, B), -1]))
        return pos
