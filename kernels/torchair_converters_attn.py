"""GE converters (torchair, Ascend) for ``omni::sparse_attention``,
``omni::sparse_attention_mla_decode``, ``omni::latent_attention`` and ``omni::mask_positions``.

Built against torchair 2.13's real sources (``register_fx_node_ge_converter``; the typed raw ops
of ``torchair._ge_concrete_graph.ge_apis``, generated from CANN's IR prototypes) and checked on
CPU through torchair's real FX → GE pipeline, each emitted op against those prototypes; not run
on an NPU. The ops: Cast, Shape, GatherV2, ConcatV2, Reshape, ExpandDims, Range,
Less/LessEqual/Greater, Sub, LogicalAnd/LogicalOr, SelectV2, SoftmaxV2, Mul, BatchMatMulV2, Slice.

The graph is the dense masked form (scores over all Sk keys, sink+recent causal mask built from
q_pos in the graph): correct on any shape, not fast. A fast Ascend path would hand the sink and
recent blocks to FusedInferAttentionScore through a trimmed block table, as OmniInfer does.

``build_sparse_attention`` takes the op emitter as a parameter, so the composition itself is
also checked by ``tests/unit/test_sparse_attention_op.py`` with a torch emulator of those IR
ops, without torchair.

Call ``register()`` once after ``import torchair``; it returns False when torchair is absent.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

# op(op_type, inputs: dict[str, tensor | list[tensor]], attrs: dict[str, python value]) -> tensor
Emit = Callable[[str, dict, dict], Any]
# const(value, dtype) -> tensor
MakeConst = Callable[[Any, torch.dtype], Any]

_NEG_BIG = -1e30  # masked logits; finite so that a row with no visible key gives zeros, not NaN
DENSE = (0, -1)   # (sink, recent) of dense causal attention (omni::latent_attention's convention)


def build_sparse_attention(op: Emit, const: MakeConst, q, k, v, q_pos, sink: int, recent: int,
                           scale: float, q_heads: int, out_dtype: torch.dtype):
    """Emit sink+recent causal attention as GE ops (dense scores, explicit mask, fp32 softmax).

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv], q_pos [B, Sq] -> [B, Hq, Sq, Dv].
    Query heads h = kv_head * G + g (as in the reference), so q reshapes to [B, Hkv, G*Sq, D]
    without a copy and every query group meets its kv head in one BatchMatMul.
    """
    f32, i64 = torch.float32, torch.int64

    def cast(x, dtype):
        return op("Cast", {"x": x}, {"dst_type": dtype})

    def dims(shape, idx):
        return op("GatherV2", {"x": shape, "indices": const(idx, i64), "axis": const(0, i64)}, {})

    def concat(parts):
        return op("ConcatV2", {"x": parts, "concat_dim": const(0, i64)}, {"N": len(parts)})

    # fp32 first: the arithmetic is fp32, and Shape / ExpandDims do not take bf16 (IR prototypes)
    q, k, v = cast(q, f32), cast(k, f32), cast(v, f32)
    shape_q = op("Shape", {"x": q}, {"dtype": i64})
    shape_k = op("Shape", {"x": k}, {"dtype": i64})
    shape_v = op("Shape", {"x": v}, {"dtype": i64})
    minus_one = const([-1], i64)

    # scores [B, Hkv, G*Sq, Sk] in fp32
    q_grouped = op("Reshape", {"x": q, "shape": concat([dims(shape_k, [0, 1]), minus_one,
                                                                    dims(shape_q, [3])])}, {})
    scores = op("BatchMatMulV2", {"x1": q_grouped, "x2": k}, {"adj_x1": False, "adj_x2": True})
    scores = op("Mul", {"x1": scores, "x2": const(scale, f32)}, {})
    shape_scores = op("Shape", {"x": scores}, {"dtype": i64})
    # view as [B, Hkv, G, Sq, Sk] so the [B, 1, 1, Sq, Sk] mask broadcasts over heads and groups
    scores5 = op("Reshape", {"x": scores, "shape": concat([dims(shape_k, [0, 1]), minus_one,
                                                           dims(shape_q, [2]), dims(shape_k, [2])])}, {})

    # visible[b, s, j] = j <= p and (j < sink or j > p - recent); (sink, recent) = (0, -1): j <= p
    j = op("Range", {"start": const(0, i64), "limit": dims(shape_k, 2), "delta": const(1, i64)}, {})
    p = op("ExpandDims", {"x": cast(q_pos, i64), "axis": const(-1, i64)}, {})  # [B, Sq, 1]
    causal = op("LessEqual", {"x1": j, "x2": p}, {})
    if (sink, recent) == DENSE:
        visible = causal
    else:
        in_sink = op("Less", {"x1": j, "x2": const(sink, i64)}, {})
        in_recent = op("Greater", {"x1": j, "x2": op("Sub", {"x1": p, "x2": const(recent, i64)}, {})}, {})
        visible = op("LogicalAnd", {"x1": causal, "x2": op("LogicalOr", {"x1": in_sink, "x2": in_recent}, {})}, {})
    for _ in range(2):
        visible = op("ExpandDims", {"x": visible, "axis": const(1, i64)}, {})  # [B, 1, 1, Sq, Sk]

    masked = op("SelectV2", {"condition": visible, "then": scores5, "else": const(_NEG_BIG, f32)}, {})
    probs = op("SoftmaxV2", {"x": masked}, {"axes": [-1]})
    probs = op("Mul", {"x1": probs, "x2": cast(visible, f32)}, {})  # rows with nothing visible -> 0
    probs = op("Reshape", {"x": probs, "shape": shape_scores}, {})
    out = op("BatchMatMulV2", {"x1": probs, "x2": v}, {"adj_x1": False, "adj_x2": False})
    out = op("Reshape", {"x": out, "shape": concat([dims(shape_q, [0]), const([q_heads], i64),
                                                    dims(shape_q, [2]), dims(shape_v, [3])])}, {})
    return cast(out, out_dtype)


def build_mla_decode(op: Emit, const: MakeConst, q, kv, q_pos, sink: int, recent: int, scale: float,
                     v_head_dim: int, q_heads: int, out_dtype: torch.dtype):
    """Absorbed MLA: kv [B, Sk, Dk] is one shared head; values are its first v_head_dim dims."""
    i64 = torch.int64
    kv = op("Cast", {"x": kv}, {"dst_type": torch.float32})  # ExpandDims takes no bf16
    k = op("ExpandDims", {"x": kv, "axis": const(1, i64)}, {})  # [B, 1, Sk, Dk]
    v = op("Slice", {"x": k, "offsets": const([0, 0, 0, 0], i64), "size": const([-1, -1, -1, v_head_dim], i64)}, {})
    return build_sparse_attention(op, const, q, k, v, q_pos, sink, recent, scale, q_heads, out_dtype)


def build_latent_attention(op: Emit, const: MakeConst, q, kv_c, k_pe, q_pos, scale: float, sink: int,
                           recent: int, q_heads: int, out_dtype: torch.dtype):
    """``omni::latent_attention``: every head attends to one shared latent head (MQA) whose key is
    ``[kv_c, k_pe]`` and whose value is ``kv_c``. q [B, H, Sq, R + Dr], kv_c [B, Sk, R],
    k_pe [B, Sk, Dr], q_pos [B, Sq] -> [B, H, Sq, R]."""
    i64, f32 = torch.int64, torch.float32
    kv_c = op("Cast", {"x": kv_c}, {"dst_type": f32})  # ExpandDims and Shape take no bf16
    k_pe = op("Cast", {"x": k_pe}, {"dst_type": f32})
    key = op("ConcatV2", {"x": [kv_c, k_pe], "concat_dim": const(2, i64)}, {"N": 2})
    k = op("ExpandDims", {"x": key, "axis": const(1, i64)}, {})    # [B, 1, Sk, R + Dr]
    v = op("ExpandDims", {"x": kv_c, "axis": const(1, i64)}, {})   # [B, 1, Sk, R]
    return build_sparse_attention(op, const, q, k, v, q_pos, sink, recent, scale, q_heads, out_dtype)


def register() -> bool:
    """Register both converters with torchair. False (nothing done) when torchair is absent."""
    try:
        from torchair._ge_concrete_graph import ge_apis as ge
        from torchair._ge_concrete_graph.fx2ge_converter import register_fx_node_ge_converter
        from torchair.ge._ge_graph import ge_type_to_torch_type, torch_type_to_ge_type
    except ImportError:
        return False

    import kernels.sparse_attention  # noqa: F401  (defines the ops)
    import kernels.sparse_attention_positions  # noqa: F401
    import kernels.latent_attention  # noqa: F401

    def attr(value):
        return torch_type_to_ge_type(value) if isinstance(value, torch.dtype) else value

    def op(op_type, inputs, attrs):
        return emit_raw_op(ge, op_type, inputs, {name: attr(value) for name, value in attrs.items()})

    def const(value, dtype):
        return ge.Const(value, dtype=torch_type_to_ge_type(dtype))

    def heads(q) -> int:
        size = q.symsize[1]
        if not isinstance(size, int):
            raise NotImplementedError(f"omni sparse attention on GE needs a static head count, got {size}")
        return size

    @register_fx_node_ge_converter(torch.ops.omni.mask_positions.default)
    def _convert_mask_positions(allowed, check, context, meta_outputs=None):
        return emit_mask_positions(ge, allowed, check)

    @register_fx_node_ge_converter(torch.ops.omni.sparse_attention.default)
    def _convert_sparse_attention(q, k, v, q_pos, sink, recent, scale, meta_outputs=None):
        return build_sparse_attention(op, const, q, k, v, q_pos, sink, recent, scale, heads(q),
                                      ge_type_to_torch_type(meta_outputs.dtype))

    if hasattr(torch.ops.omni, "latent_attention"):
        @register_fx_node_ge_converter(torch.ops.omni.latent_attention.default)
        def _convert_latent(q, kv_c, k_pe, q_pos, scale, sink, recent, meta_outputs=None):
            return build_latent_attention(op, const, q, kv_c, k_pe, q_pos, scale, sink, recent, heads(q),
                                          ge_type_to_torch_type(meta_outputs.dtype))

    @register_fx_node_ge_converter(torch.ops.omni.sparse_attention_mla_decode.default)
    def _convert_mla(q, kv, q_pos, sink, recent, scale, v_head_dim, meta_outputs=None):
        return build_mla_decode(op, const, q, kv, q_pos, sink, recent, scale, v_head_dim, heads(q),
                                ge_type_to_torch_type(meta_outputs.dtype))

    return True


def emit_mask_positions(ge, allowed, check: bool):
    """``omni::mask_positions`` in GE: allowed bool [b, h, Sq, Sk] -> int64 [b, Sq], the count of
    allowed keys per row minus one (head 0). With ``check``, an Assert (kept alive by a control
    edge into the result) fails the graph unless every row allows exactly the keys [0, p] and all
    heads agree: the same refusal as the reference, in place of its Python exception."""
    from torchair.ge import DataType
    from torchair.ge._ge_graph import ControlTensor, get_default_ge_graph

    i64 = DataType.DT_INT64
    allowed_i64 = ge.Cast(allowed, dst_type=i64)
    counts = ge.ReduceSum(allowed_i64, ge.Const([-1], dtype=i64), keep_dims=True)            # [b, h, Sq, 1]
    last = ge.Sub(ge.Reshape(counts, ge.Slice(ge.Shape(allowed, dtype=i64), ge.Const([0], dtype=i64),
                                              ge.Const([3], dtype=i64))), ge.Const(1, dtype=i64))  # [b, h, Sq]
    positions = ge.GatherV2(last, ge.Const(0, dtype=i64), ge.Const(1, dtype=i64))             # [b, Sq]
    if not check:
        return positions
    keys = ge.Range(ge.Const(0, dtype=i64), ge.GatherV2(ge.Shape(allowed, dtype=i64), ge.Const(3, dtype=i64),
                                                          ge.Const(0, dtype=i64)), ge.Const(1, dtype=i64))
    prefix = ge.Equal(allowed, ge.Less(keys, counts))                # row j allowed <=> j < count
    heads_agree = ge.Equal(last, ge.ExpandDims(positions, ge.Const(1, dtype=i64)))
    ok = ge.LogicalAnd(ge.ReduceAll(prefix, ge.Const([0, 1, 2, 3], dtype=i64)),
                       ge.ReduceAll(heads_agree, ge.Const([0, 1, 2], dtype=i64)))
    ge.Assert(ok, [positions])
    assertion = ControlTensor(get_default_ge_graph().op[-1])
    return ge.Identity(positions, dependencies=[assertion])


# Python keywords among IR input names: torchair's generated functions rename them.
_RENAMED_INPUTS = {"else": "else_changed_as_is_python_key"}


def emit_raw_op(ge, op_type: str, inputs: dict, attrs: dict):
    """Call torchair's generated function for IR ``op_type`` with named inputs: every input of
    the prototype in order (optional ones absent → None), attributes as keywords. A name the
    prototype does not have is an error, so the builder cannot drift from the IR. Ops with
    several outputs return their first (the builders use single-output ops only)."""
    import inspect

    fn = getattr(ge, op_type, None)
    if fn is None:
        raise NotImplementedError(f"GE op {op_type} is not among torchair's IR ops")
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    names = {_RENAMED_INPUTS.get(name, name) for name in inputs}
    unknown = names - {p.name for p in params}
    if unknown:
        raise TypeError(f"GE op {op_type} has no input(s) {sorted(unknown)}; its inputs: {[p.name for p in params]}")
    by_name = {_RENAMED_INPUTS.get(name, name): value for name, value in inputs.items()}
    out = fn(*[by_name.get(p.name) for p in params], **attrs)
    return out[0] if isinstance(out, (tuple, list)) else out
