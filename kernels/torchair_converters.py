"""GE converters (torchair, Ascend) for the omni MoE ops; importing this module registers them
and the attention and aten ones (``torchair_converters_attn``, ``torchair_converters_aten``).

Imported only after torchair (``omni_passes.hosts.torchair.register_converters``). Every GE
op here is a typed raw op of ``torchair._ge_concrete_graph.ge_apis``, generated from CANN's IR
prototypes, so argument names and arity are checked as the graph is built; the tests also check
each emitted op against the prototypes' dtypes and attributes.

torchair calls converters under FakeTensorMode. A converter must not compute on real tensors
there (``Please convert all Tensors to FakeTensors first``), so the placement tables are read
with fake mode switched off, once, and bound into the GE graph as constants. GE graphs cannot
call back into Python, which has two consequences on an NPU (both enforced, not silent):
- a placement applied after the graph was built would not reach it: ``check_bound_tables``
  (called before each run by ``omni_passes.hosts.torchair``) refuses to run on stale tables;
- ``omni::record_expert_load`` adds to a host tensor, which a GE graph cannot write: its
  converter emits nothing and logs that loads are not recorded in GE graph mode. With
  torchair's ``debug.run_eagerly`` the FX graph runs instead and records them.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torchair._ge_concrete_graph import ge_apis as ge
from torchair._ge_concrete_graph.fx2ge_converter import register_fx_node_ge_converter
from torchair.ge import DataType, Tensor, TensorSpec

import kernels  # noqa: F401  (defines the omni ops)
from kernels.state import lookup

log = logging.getLogger("omni_passes")

I64 = DataType.DT_INT64

_lock = threading.Lock()
# (state handle, MoE layer) -> the tables a GE graph was built with
_bound: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


class StaleGEGraph(RuntimeError):
    """A placement changed after the GE graph bound its tables; recompile."""


def bound_tables(state: int, layer: int) -> tuple[list, list]:
    """Layer ``layer``'s replica table ``[E, M]`` and counts ``[E]`` as Python lists, read from
    the real tensors outside torchair's FakeTensorMode, and remembered for ``check_bound_tables``."""
    with unset_fake_temporarily():
        slots = lookup(state, "replica_slots")[layer].detach().cpu().clone()
        counts = lookup(state, "replica_count")[layer].detach().cpu().clone()
    with _lock:
        _bound[(state, layer)] = (slots, counts)
    return slots.tolist(), counts.tolist()


def bound_keys() -> set[tuple[int, int]]:
    """The (state, layer) tables bound so far; a backend diffs it around one compile."""
    with _lock:
        return set(_bound)


def check_bound_tables(keys: set[tuple[int, int]] | None = None) -> None:
    """Raise StaleGEGraph if a bound table (of ``keys``, default all) differs from its live state."""
    with _lock:
        items = [(key, value) for key, value in _bound.items() if keys is None or key in keys]
    for (state, layer), (slots, counts) in items:
        live_slots = lookup(state, "replica_slots")[layer]
        live_counts = lookup(state, "replica_count")[layer]
        if not (torch.equal(live_slots.cpu(), slots) and torch.equal(live_counts.cpu(), counts)):
            raise StaleGEGraph(
                f"the placement of MoE layer {layer} changed after its GE graph was built with the old "
                "dispatch tables (GE graphs hold them as constants); recompile (torch._dynamo.reset() and "
                "call the model again) after apply_placement on the torchair backend"
            )


def emit_expert_dispatch(topk_ids: Tensor, slots: list, counts: list) -> Tensor:
    """GE ops for ``expert_dispatch_reference`` on bound tables.

    topk_ids [..., K] (int32/int64) -> slot ids, same shape and dtype. The j-th occurrence of
    expert e in token order takes replica ``j mod counts[e]``: a stable sort groups equal ids in
    token order; an entry's occurrence is its sorted position minus its group's start (the
    running max of the positions where the id changes), scattered back to token order.
    """
    flat = ge.Reshape(ge.Cast(topk_ids, dst_type=I64), ge.Const([-1], dtype=I64))         # [n]
    n = ge.Size(flat, dtype=I64)                                                            # scalar
    sorted_ids, order = ge.Sort(flat, axis=0, descending=False, stable=True)                # [n], [n] int32
    position = ge.Range(ge.Const(0, dtype=I64), n, ge.Const(1, dtype=I64))                  # [n]
    head = ge.Slice(sorted_ids, ge.Const([0], dtype=I64), ge.Reshape(ge.Sub(n, ge.Const(1, dtype=I64)),
                                                                     ge.Const([1], dtype=I64)))
    previous = ge.ConcatV2([ge.Const([-1], dtype=I64), head], ge.Const(0, dtype=I64), N=2)  # [n]
    starts_here = ge.NotEqual(sorted_ids, previous)
    group_start, _ = ge.Cummax(ge.SelectV2(starts_here, position, ge.ZerosLike(position)), dim=0)
    occurrence_sorted = ge.Sub(position, group_start)
    occurrence = ge.ScatterNd(ge.ExpandDims(order, ge.Const(1, dtype=I64)), occurrence_sorted,
                              ge.Reshape(n, ge.Const([1], dtype=I64)))                      # token order
    count = ge.GatherV2(ge.Const(counts, dtype=I64), flat, ge.Const(0, dtype=I64))
    replica = ge.FloorMod(occurrence, count)
    chosen = ge.GatherNd(ge.Const(slots, dtype=I64), ge.Pack([flat, replica], N=2, axis=1))
    return ge.Reshape(ge.Cast(chosen, dst_type=topk_ids.dtype), ge.Shape(topk_ids, dtype=I64))


@register_fx_node_ge_converter(torch.ops.omni.expert_dispatch.default)
def convert_expert_dispatch(topk_ids: Tensor, state: int, layer: int, meta_outputs: TensorSpec = None):
    slots, counts = bound_tables(state, layer)
    return emit_expert_dispatch(topk_ids, slots, counts)


@register_fx_node_ge_converter(torch.ops.omni.record_expert_load.default)
def convert_record_expert_load(topk_ids: Tensor, state: int, layer: int, meta_outputs: TensorSpec = None):
    log.warning("omni::record_expert_load (MoE layer %d): expert loads are not recorded in GE graph mode "
                "(a GE graph cannot add to the host counter); torchair's debug.run_eagerly records them", layer)
    return None


from kernels import torchair_converters_aten, torchair_converters_attn  # noqa: E402  (register theirs)

torchair_converters_attn.register()
torchair_converters_aten.register()
