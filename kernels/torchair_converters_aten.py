"""GE converters for the ops of transformers' grouped-GEMM MoE that torchair 2.13 cannot convert.

transformers' DeepSeek experts (``_experts_implementation = "grouped_mm"``) count tokens per
expert with ``aten.histc`` and multiply with ``transformers.grouped_mm_fallback`` (CPU, fp32)
or ``aten._grouped_mm``; torchair has no converter for any of them, so without these the
model's graph never reaches GE. ``register()`` adds each only where torchair has none.

- histc(x, bins, min, max) → bin = floor((x - min) * bins / (max - min)) clamped to
  [0, bins - 1], counted with UnsortedSegmentSum over the elements inside [min, max] (torch's
  rule: x == max falls in the last bin, elements outside are ignored);
- grouped_mm(x [S, K], w [E, K, N], offs [E] cumulative ends) → GroupedMatmul with one
  x and one weight tensor, split along M (group_type 0), cumulative group list (type 0), one
  output (split_item 3): the form torch_npu's ``npu_grouped_matmul`` takes for MoE experts;
- index_put(x, [i0, ..., ik-1], values, accumulate) with k index tensors of one shape (what
  ``inv_perm[perm] = arange(n)`` traces to) → TensorScatterUpdate on the stacked indices
  (negative ones wrapped), values broadcast to the updated slices; accumulate → x + ScatterNd;
- index_copy(x, dim, index, source) (transformers' static KV cache update) → Transpose the dim
  first, TensorScatterUpdate, Transpose back.
"""

from __future__ import annotations

import torch

def emit_histc(ge, DataType, x, bins: int, low: float, high: float, out_dtype: int):
    if not high > low:
        raise NotImplementedError(f"aten.histc on GE needs max > min (got min={low}, max={high}); "
                                  "the data-dependent range is not converted")
    f32, i32 = DataType.DT_FLOAT, DataType.DT_INT32
    flat = ge.Reshape(ge.Cast(x, dst_type=f32), ge.Const([-1], dtype=DataType.DT_INT64))
    scaled = ge.Mul(ge.Sub(flat, ge.Const(float(low), dtype=f32)), ge.Const(bins / (high - low), dtype=f32))
    index = ge.Cast(ge.Floor(scaled), dst_type=i32)
    index = ge.Minimum(ge.Maximum(index, ge.Const(0, dtype=i32)), ge.Const(bins - 1, dtype=i32))
    inside = ge.LogicalAnd(ge.GreaterEqual(flat, ge.Const(float(low), dtype=f32)),
                           ge.LessEqual(flat, ge.Const(float(high), dtype=f32)))
    counts = ge.UnsortedSegmentSum(ge.Cast(inside, dst_type=f32), index, ge.Const(bins, dtype=i32))
    return ge.Cast(counts, dst_type=out_dtype)


def emit_grouped_mm(ge, DataType, x, weight, offs):
    def empty(dtype):
        return [ge.Fill(ge.Const([0], dtype=DataType.DT_INT64), ge.Cast(ge.Const(0.0), dst_type=dtype))]

    group_list = ge.Cast(offs, dst_type=DataType.DT_INT64)
    bias_dtype = DataType.DT_FLOAT if x.dtype == DataType.DT_BF16 else x.dtype
    outputs = ge.GroupedMatmul([x], [weight], empty(bias_dtype), empty(DataType.DT_UINT64), empty(DataType.DT_FLOAT),
                               empty(DataType.DT_FLOAT16), empty(DataType.DT_FLOAT16), group_list, None,
                               split_item=3, dtype=-1, transpose_weight=False, transpose_x=False,
                               group_type=0, group_list_type=0, act_type=0)
    return outputs[0]


def emit_index_put(ge, DataType, x, indices: list, values, accumulate: bool):
    i64 = DataType.DT_INT64
    if not indices or any(i is None for i in indices):
        raise NotImplementedError("index_put on GE: only indexing by tensors in the leading dimensions "
                                  "(no None / slices between them) is converted")
    shape_x = ge.Shape(x, dtype=i64)
    wrapped = []
    for dim, index in enumerate(indices):
        index = ge.Cast(index, dst_type=i64)
        size = ge.GatherV2(shape_x, ge.Const(dim, dtype=i64), ge.Const(0, dtype=i64))
        wrapped.append(ge.SelectV2(ge.Less(index, ge.Const(0, dtype=i64)), ge.Add(index, size), index))
    stacked = ge.Pack(wrapped, N=len(wrapped), axis=-1)                                  # [..., k]
    rank = x.rank
    slice_shape = ge.Slice(shape_x, ge.Const([len(indices)], dtype=i64), ge.Const([rank - len(indices)], dtype=i64))
    target = ge.ConcatV2([ge.Shape(wrapped[0], dtype=i64), slice_shape], ge.Const(0, dtype=i64), N=2)
    updates = ge.BroadcastTo(ge.Cast(values, dst_type=x.dtype), target)
    if accumulate:  # ScatterNd adds duplicates and takes every basic dtype (TensorScatterAdd: no int64)
        return ge.Add(x, ge.ScatterNd(stacked, updates, shape_x))
    return ge.TensorScatterUpdate(x, stacked, updates)


def emit_index_copy(ge, DataType, x, dim: int, index, source):
    """index_copy(x, dim, index, source): rows ``index`` of ``x`` along ``dim`` become ``source``'s
    (transformers' static KV cache update). The dim goes first, TensorScatterUpdate, and back."""
    rank = x.rank
    dim %= rank
    perm = [dim] + [d for d in range(rank) if d != dim]
    inverse = [perm.index(d) for d in range(rank)]
    i64 = DataType.DT_INT64
    moved = ge.Transpose(x, ge.Const(perm, dtype=i64))
    updates = ge.Transpose(source, ge.Const(perm, dtype=i64))
    indices = ge.ExpandDims(ge.Cast(index, dst_type=i64), ge.Const(1, dtype=i64))
    return ge.Transpose(ge.TensorScatterUpdate(moved, indices, updates), ge.Const(inverse, dtype=i64))


def _has_working_converter(op) -> bool:
    """torchair registers placeholders that raise NotImplementedError for many aten ops."""
    import inspect

    converter = getattr(op, "_ge_converter", None)
    if converter is None:
        return False
    try:
        source = inspect.getsource(converter)
    except (OSError, TypeError):
        return True
    return "ge_converter is not implemented" not in source


def register() -> bool:
    """Register the converters torchair lacks; False when torchair is absent."""
    try:
        from torchair._ge_concrete_graph import ge_apis as ge
        from torchair._ge_concrete_graph.fx2ge_converter import register_fx_node_ge_converter
        from torchair.ge import DataType
    except ImportError:
        return False

    histc = torch.ops.aten.histc.default
    if not _has_working_converter(histc):
        @register_fx_node_ge_converter(histc)
        def _convert_histc(self, bins: int = 100, min: float = 0, max: float = 0, meta_outputs=None):  # noqa: A002
            return emit_histc(ge, DataType, self, bins, min, max, meta_outputs.dtype)

    index_put = torch.ops.aten.index_put.default
    if not _has_working_converter(index_put):
        @register_fx_node_ge_converter(index_put)
        def _convert_index_put(self, indices, values, accumulate: bool = False, meta_outputs=None):
            return emit_index_put(ge, DataType, self, list(indices), values, accumulate)

    index_copy = torch.ops.aten.index_copy.default
    if not _has_working_converter(index_copy):
        @register_fx_node_ge_converter(index_copy)
        def _convert_index_copy(self, dim: int, index, source, meta_outputs=None):
            return emit_index_copy(ge, DataType, self, dim, index, source)

    grouped = [torch.ops.aten._grouped_mm.default] if hasattr(torch.ops.aten, "_grouped_mm") else []
    try:
        import transformers.integrations.moe  # noqa: F401  (defines transformers::grouped_mm_fallback)

        grouped.append(torch.ops.transformers.grouped_mm_fallback.default)
    except (ImportError, AttributeError):
        pass
    for op in grouped:
        if _has_working_converter(op):
            continue

        @register_fx_node_ge_converter(op)
        def _convert_grouped_mm(x, weight, offs=None, bias=None, out_dtype=None, meta_outputs=None):
            if offs is None or bias is not None or out_dtype is not None:
                raise NotImplementedError("grouped_mm on GE: only the MoE form (2-D x, 3-D weight, offs, "
                                          "no bias, no out_dtype) is converted")
            return emit_grouped_mm(ge, DataType, x, weight, offs)
    return True
