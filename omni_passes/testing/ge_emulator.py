"""EMULATION: run a dumped GE graph with torch implementations of its ops, on CPU.

This is not CANN. Each op below is this project's reading of the op's documented semantics
(the TensorFlow-style IR that Ascend's GE inherits), written with torch ops. Running a GE graph
that torchair built from our converters through it checks the *arithmetic* the graph describes
against the PyTorch reference, and gives every edge a concrete dtype, which
``ge_ir.check_dtypes`` compares with the IR prototypes. It says nothing about whether CANN has
kernels for these ops and dtypes, about GE's shape inference, or about NPU numerics.

    emulator = GEEmulator(load_graph(path))
    outputs = emulator.run([tensor0, tensor1, ...])     # feeds in Data-op index order
    emulator.dtypes[op_name] -> (input dtypes, output dtypes)

Ops without an emulation raise ``NotEmulated`` naming them.
"""

from __future__ import annotations

from typing import Callable

import torch

GE_DTYPES = {"DT_FLOAT": torch.float32, "DT_FLOAT16": torch.float16, "DT_BF16": torch.bfloat16,
             "DT_DOUBLE": torch.float64, "DT_INT8": torch.int8, "DT_INT16": torch.int16, "DT_INT32": torch.int32,
             "DT_INT64": torch.int64, "DT_UINT8": torch.uint8, "DT_BOOL": torch.bool, "DT_UINT64": torch.uint64}
# torchair's ge.DataType numbering (the value of Type/Int dtype attributes)
GE_DTYPE_CODES = {0: torch.float32, 1: torch.float16, 2: torch.int8, 3: torch.int32, 4: torch.uint8, 6: torch.int16,
                  9: torch.int64, 10: torch.uint64, 11: torch.float64, 12: torch.bool, 27: torch.bfloat16}


class NotEmulated(NotImplementedError):
    pass


def _attr(value):
    which = value.WhichOneof("value")
    if which == "list":
        lst = value.list
        for name in ("i", "f", "b", "s", "dt"):
            items = list(getattr(lst, name))
            if items:
                return items
        return []
    if which == "s":
        return value.s.decode()
    return getattr(value, which) if which else None


def _const(op) -> torch.Tensor:
    from torchair._ge_concrete_graph.ge_ir_pb2 import DataType as ProtoDataType

    tensor = op.attr["value"].t
    dtype = GE_DTYPES[ProtoDataType.Name(tensor.desc.dtype)]
    shape = list(tensor.desc.shape.dim)
    flat = torch.frombuffer(bytearray(tensor.data), dtype=dtype) if tensor.data else torch.empty(0, dtype=dtype)
    return flat.clone().reshape(shape)


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _gather_v2(x, indices, axis, batch_dims=0, **_):
    axis = int(axis) % x.dim()
    picked = x.index_select(axis, indices.reshape(-1).long())
    return picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]))


def _slice(x, offsets, size, **_):
    out = x
    for dim, (start, length) in enumerate(zip(_ints(offsets), _ints(size))):
        stop = x.shape[dim] if length == -1 else start + length
        out = out.narrow(dim, start, stop - start)
    return out


def _scatter_nd(indices, x, shape, **_):
    out = torch.zeros(_ints(shape), dtype=x.dtype)
    index = tuple(indices.long().unbind(-1))
    return out.index_put_(index, x, accumulate=True)  # duplicates add, as in the IR's definition


def _tensor_scatter(accumulate):
    def run(x, indices, updates, **_):
        return x.clone().index_put_(tuple(indices.long().unbind(-1)), updates, accumulate=accumulate)
    return run


def _unsorted_segment_sum(x, segment_ids, num_segments, **_):
    ids = segment_ids.reshape(-1).long()
    rows = x.reshape(ids.numel(), *x.shape[segment_ids.dim():])
    out = torch.zeros(int(num_segments), *rows.shape[1:], dtype=x.dtype)
    return out.index_add_(0, ids, rows)


def _grouped_matmul(x, weight, bias, scale, offset, antiquant_scale, antiquant_offset, group_list,
                    per_token_scale, split_item=0, group_type=-1, group_list_type=0, transpose_weight=False,
                    transpose_x=False, **_):
    if not (len(x) == 1 and len(weight) == 1 and split_item == 3 and group_type == 0 and group_list_type == 0
            and not transpose_weight and not transpose_x):
        raise NotEmulated("GroupedMatmul: only one x [M, K], one weight [E, K, N], cumulative group_list "
                          "along M (group_type 0, group_list_type 0), split_item 3 is emulated")
    inputs, weights = x[0], weight[0]
    out = torch.zeros(inputs.shape[0], weights.shape[-1], dtype=inputs.dtype)  # rows past the last group: 0
    start = 0
    for expert, end in enumerate(_ints(group_list)):
        if end > start:
            out[start:end] = inputs[start:end] @ weights[expert]
        start = end
    return [out]


def _cummax(x, dim, **_):
    values, indices = torch.cummax(x, dim=dim)
    return values, indices


def _sort(x, axis=-1, descending=False, stable=False, **_):
    values, indices = torch.sort(x, dim=axis, descending=descending, stable=stable)
    return values, indices.int()


def _batch_matmul(x1, x2, bias=None, offset_w=None, adj_x1=False, adj_x2=False, **_):
    a = x1.transpose(-1, -2) if adj_x1 else x1
    b = x2.transpose(-1, -2) if adj_x2 else x2
    out = a @ b
    return out + bias if bias is not None else out




def _assert(condition, data):
    if not bool(condition.all()):
        raise AssertionError(f"GE Assert failed (emulated); data: {[d.tolist() for d in data]}")
    return []


def _unsqueeze(x, axes):
    for axis in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _strided_slice_v2(x, begin, end, axes=None, strides=None, begin_mask=0, end_mask=0, ellipsis_mask=0,
                      new_axis_mask=0, shrink_axis_mask=0, **_):
    if ellipsis_mask or new_axis_mask or shrink_axis_mask:
        raise NotEmulated("StridedSliceV2 with ellipsis / new-axis / shrink masks")
    begins, ends = _ints(begin), _ints(end)
    dims = _ints(axes) if axes is not None else list(range(len(begins)))
    steps = _ints(strides) if strides is not None else [1] * len(begins)
    index = [slice(None)] * x.dim()
    for i, (dim, b, e, step) in enumerate(zip(dims, begins, ends, steps)):
        index[dim % x.dim()] = slice(None if begin_mask >> i & 1 else b, None if end_mask >> i & 1 else e, step)
    return x[tuple(index)]


def _index_by_tensor(x, indices, indices_mask=(), **_):
    given = iter(indices)
    index = tuple(next(given).long() if present else slice(None) for present in indices_mask)
    return x[index]


def _split_v(x, size_splits, split_dim, num_split, **_):
    dim = int(split_dim) % x.dim()
    sizes = _ints(size_splits)
    if -1 in sizes:
        sizes[sizes.index(-1)] = x.shape[dim] - (sum(sizes) + 1)
    return list(torch.split(x, sizes, dim=dim))


def _matmul(x1, x2, bias=None, transpose_x1=False, transpose_x2=False, **_):
    out = (x1.t() if transpose_x1 else x1) @ (x2.t() if transpose_x2 else x2)
    return out + bias if bias is not None else out


def _scatter_elements(data, indices, updates, axis=0, reduction="none", **_):
    if reduction == "none":
        return data.clone().scatter_(axis, indices.long(), updates)
    if reduction == "add":
        return data.clone().scatter_add_(axis, indices.long(), updates)
    raise NotEmulated(f"ScatterElements reduction {reduction}")


def _cumsum(x, axis, exclusive=False, reverse=False, **_):
    dim = int(axis)
    y = x.flip(dim) if reverse else x
    out = torch.cumsum(y, dim=dim, dtype=x.dtype)
    if exclusive:
        out = out - y
    return out.flip(dim) if reverse else out


def _topk(x, k, sorted=True, dim=-1, largest=True, **_):  # noqa: A002
    values, indices = torch.topk(x, int(k), dim=dim, largest=largest, sorted=sorted)
    return values, indices.int()


def _softmax(x, axes):
    if len(axes) != 1:
        raise NotEmulated(f"SoftmaxV2 over several axes {axes}")
    return torch.softmax(x, dim=axes[0])


OPS: dict[str, Callable] = {
    "Cast": lambda x, dst_type, **_: x.to(GE_DTYPE_CODES[dst_type]),
    "Reshape": lambda x, shape, **_: x.reshape(_ints(shape)),
    "Size": lambda x, dtype=3, **_: torch.tensor(x.numel(), dtype=GE_DTYPE_CODES[dtype]),
    "Shape": lambda x, dtype=3, **_: torch.tensor(list(x.shape), dtype=GE_DTYPE_CODES[dtype]),
    "Sort": _sort,
    "Range": lambda start, limit, delta, **_: torch.arange(start.item(), limit.item(), delta.item(),
                                                           dtype=torch.promote_types(start.dtype, limit.dtype)),
    "Slice": _slice,
    "ConcatV2": lambda x, concat_dim, **_: torch.cat(x, dim=int(concat_dim)),
    "Pack": lambda x, axis=0, **_: torch.stack(x, dim=axis),
    "ExpandDims": lambda x, axis, **_: x.unsqueeze(int(axis)),
    "Unsqueeze": lambda x, axes=(), **_: _unsqueeze(x, axes),
    "BroadcastTo": lambda x, shape, **_: x.expand(_ints(shape)).clone(),
    "Fill": lambda dims, value, **_: torch.full(_ints(dims), value.item(), dtype=value.dtype),
    "ZerosLike": lambda x, **_: torch.zeros_like(x),
    "SelectV2": lambda condition, then, else_, **_: torch.where(condition, then, else_),
    "NotEqual": lambda x1, x2, **_: x1 != x2,
    "Less": lambda x1, x2, **_: x1 < x2,
    "LessEqual": lambda x1, x2, **_: x1 <= x2,
    "Greater": lambda x1, x2, **_: x1 > x2,
    "GreaterEqual": lambda x1, x2, **_: x1 >= x2,
    "LogicalAnd": lambda x1, x2, **_: x1 & x2,
    "LogicalOr": lambda x1, x2, **_: x1 | x2,
    "Add": lambda x1, x2, **_: x1 + x2,
    "Sub": lambda x1, x2, **_: x1 - x2,
    "Mul": lambda x1, x2, **_: x1 * x2,
    "Maximum": lambda x1, x2, **_: torch.maximum(x1, x2),
    "Minimum": lambda x1, x2, **_: torch.minimum(x1, x2),
    "FloorMod": lambda x1, x2, **_: torch.remainder(x1, x2),
    "Floor": lambda x, **_: torch.floor(x),
    "Cummax": _cummax,
    "ScatterNd": _scatter_nd,
    "TensorScatterUpdate": _tensor_scatter(False),
    "TensorScatterAdd": _tensor_scatter(True),
    "GatherV2": _gather_v2,
    "GatherNd": lambda x, indices, **_: x[tuple(indices.long().unbind(-1))],
    "UnsortedSegmentSum": _unsorted_segment_sum,
    "GroupedMatmul": _grouped_matmul,
    "SoftmaxV2": lambda x, axes=(-1,), **_: _softmax(x, axes),
    "BatchMatMulV2": _batch_matmul,
    "Identity": lambda x, **_: x,
    "Equal": lambda x1, x2, **_: x1 == x2,
    "LogicalNot": lambda x, **_: ~x,
    "ReduceSum": lambda x, axes, keep_dims=False, **_: x.sum(dim=_ints(axes), keepdim=keep_dims, dtype=x.dtype),
    "ReduceAll": lambda x, axes, keep_dims=False, **_: x.all(dim=tuple(_ints(axes)), keepdim=keep_dims),
    "Assert": lambda input_condition, input_data, **_: _assert(input_condition, input_data),
    # the rest of the ops torchair emits for the tiny DeepSeek-V3
    "Transpose": lambda x, perm, **_: x.permute(_ints(perm)),
    "StridedSliceV2": _strided_slice_v2,
    "MatMul": _matmul,
    "BatchMatMul": lambda x1, x2, adj_x1=False, adj_x2=False, **_: _batch_matmul(x1, x2, None, None, adj_x1, adj_x2),
    "Rsqrt": lambda x, **_: torch.rsqrt(x),
    "ReduceMean": lambda x, axes, keep_dims=False, **_: x.mean(dim=_ints(axes), keepdim=keep_dims),
    "Pow": lambda x1, x2, **_: torch.pow(x1, x2),
    "SplitV": _split_v,
    "TopKV2": _topk,
    "IndexByTensor": _index_by_tensor,
    "Swish": lambda x, scale=1.0, **_: x * torch.sigmoid(scale * x),
    "Tril": lambda x, diagonal=0, **_: torch.tril(x, diagonal),
    "Empty": lambda shape, dtype=3, **_: torch.zeros(_ints(shape), dtype=GE_DTYPE_CODES[dtype]),
    "Sigmoid": lambda x, **_: torch.sigmoid(x),
    "ScatterElements": _scatter_elements,
    "RealDiv": lambda x1, x2, **_: x1 / x2,
    "FloorDiv": lambda x1, x2, **_: torch.div(x1, x2, rounding_mode="floor"),
    "MaskedFill": lambda x, mask, value, **_: torch.where(mask, value.to(x.dtype), x),
    "GatherElements": lambda x, index, dim=0, **_: torch.gather(x, dim, index.long()),
    "Cumsum": _cumsum,
    "Sin": lambda x, **_: torch.sin(x),
    "Cos": lambda x, **_: torch.cos(x),
}


_RENAMED = {"else": "else_"}  # Python keywords among IR input names


class GEEmulator:
    """Runs a GraphDef's ops in order (torchair writes them topologically). ``protos`` (from
    ``ge_ir.load_prototypes``) say which inputs are dynamic lists."""

    def __init__(self, graph_def, protos: dict):
        self.graph = graph_def
        self.protos = protos
        self.values: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, tuple[list, list]] = {}

    def _input(self, name: str):
        if not name:
            return None  # an absent optional input
        return self.values[name if ":" in name else f"{name}:0"]

    def _arguments(self, op, edges) -> dict:
        import re

        proto = self.protos.get(op.type)
        dynamic = {p.name for p in proto.inputs if p.kind == "dynamic"} if proto else set()
        kwargs: dict = {name: [] for name in dynamic}
        for desc, edge in zip(op.input_desc, edges):
            value = self._input(edge)
            base = re.sub(r"\d+$", "", desc.name)
            if desc.name not in (p.name for p in proto.inputs) and base in dynamic:
                kwargs[base].append(value)
            else:
                kwargs[_RENAMED.get(desc.name, desc.name)] = value
        return kwargs

    def run(self, feeds: list[torch.Tensor]) -> list[torch.Tensor]:
        from omni_passes.testing.ge_ir import data_inputs

        outputs: list[torch.Tensor] = []
        for op in self.graph.op:
            edges = data_inputs(op)
            if op.type == "Data":
                result = [feeds[op.attr["index"].i]]
            elif op.type == "Const":
                result = [_const(op)]
            elif op.type == "NetOutput":
                outputs = [self._input(e) for e in edges]
                continue
            else:
                fn = OPS.get(op.type)
                if fn is None or op.type not in self.protos:
                    raise NotEmulated(f"GE op {op.type} ({op.name}) has no emulation")
                attrs = {k: _attr(v) for k, v in op.attr.items() if not k.startswith("_")}
                out = fn(**self._arguments(op, edges), **attrs)
                result = list(out) if isinstance(out, (tuple, list)) else [out]
            for index, value in enumerate(result):
                self.values[f"{op.name}:{index}"] = value
            inputs = [self._input(e) for e in edges]
            self.dtypes[op.name] = ([v.dtype if v is not None else None for v in inputs], [v.dtype for v in result])
        return outputs
