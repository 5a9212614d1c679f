"""Inductor lowerings for ``omni::expert_dispatch`` and ``omni::record_expert_load``.

The eager kernels are a Python custom-op call per MoE layer and step, each a handful of
small aten calls; on a small decode step that fixed cost dominates. These lowerings write
the same integer arithmetic into the compiled graph instead, so Inductor fuses it with the
routing around it (C++ loops on CPU, Triton on CUDA) and no Python runs per call:

    rows[i]     = replica_slots[layer, id_i, occ_i mod replica_count[layer, id_i]]
    occ_i       = #{j < i : id_j == id_i}          (pairwise count for small static batches,
                                                    else a cumsum over the [N, E] one-hot)
    counter[v] += gate * #{i : v_i == v}           (expert_load by ids, row_load by rows)

The state's tensors enter the graph as Inductor constants bound by reference
(``V.graph.add_tensor_constant`` keeps the tensor object, it does not copy), so an in-place
placement update is read by the next call, and the counters are mutated in place by the
graph. Such code must never reach a compile cache: a cache hit in another process loads
pickled *copies* of those constants, so it would dispatch by the placement the first process
had and count into tensors nobody reads (seen on the H200, and in CI where a later process hit
an earlier one's entry). So the lowering binds constants only while Inductor's FX graph cache
is off for this compile (``omni_passes.compile`` turns it off); wherever the compiled code may
be cached (a raw ``torch.compile`` with the default settings, vLLM's compile cache) the ops stay
calls of their eager kernels, which look the state up by handle on every call, so a cached
graph reads the live tables of the process that loads it. The FX graph keeps the omni op nodes
(reports, renderers and other backends see them); only Inductor's lowering differs.

``OMNI_OPS_LOWERING=0`` makes both ops fall back to their eager kernels (to measure one
against the other); ``register()`` is idempotent and runs when the omni pass manager first
runs (importing Inductor's lowering module costs seconds, so ``import kernels`` does not).
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from kernels.common import check_layer, check_layer_rows
from kernels.state import lookup

log = logging.getLogger("omni_passes")

ENV = "OMNI_OPS_LOWERING"
# Largest static batch (top-k entries) whose occurrence index is an [N, N] masked count.
PAIRWISE_MAX = 256
# Largest static [N, counter] compare whose counts are a fused reduction (else index_put_,
# which Inductor's CPU backend runs as an eager aten call for integer accumulation).
REDUCE_MAX = 1 << 16

_lock = threading.Lock()
_registered = False


def enabled() -> bool:
    """Lower the ops for the compile in progress: not turned off by ``OMNI_OPS_LOWERING=0``,
    and the compiled code cannot land in a compile cache (see the module docstring)."""
    return os.environ.get(ENV, "1") != "0" and not compile_may_be_cached()


def compile_may_be_cached() -> bool:
    """True when Inductor may store the code it is generating for reuse by another process."""
    from torch._inductor import config

    # vLLM's standalone AOT artifacts bundle the compiled code whatever the FX cache setting
    bundled = bool(getattr(torch._functorch.config, "bundled_autograd_cache", False))
    return bundled or (bool(config.fx_graph_cache) and not config.force_disable_caches)


def register() -> bool:
    """Register the lowerings once per process; False (and a warning) if this Inductor lacks
    the interfaces they use, in which case the eager kernels run."""
    global _registered
    with _lock:
        if _registered:
            return True
        try:
            from torch._inductor.lowering import fallback_handler, lowerings, register_lowering
            from torch._inductor.virtualized import V
        except ImportError as exc:
            log.warning("omni ops: no Inductor lowering (%s); the eager kernels run", exc)
            return False
        _Lowering(lowerings, fallback_handler, V).install(register_lowering)
        _registered = True
        return True


class _Lowering:
    def __init__(self, lowerings, fallback_handler, virtualized):
        self.L = lowerings
        self.fallback = fallback_handler
        self.V = virtualized
        self.aten = torch.ops.aten

    def install(self, register_lowering) -> None:
        register_lowering(torch.ops.omni.expert_dispatch.default, type_promotion_kind=None)(self.dispatch)
        register_lowering(torch.ops.omni.record_expert_load.default, type_promotion_kind=None)(self.record)

    # ---- the two ops -------------------------------------------------------------------------
    def dispatch(self, ids, state: int, layer: int):
        if not enabled() or not _constants(state, layer):
            return self.fallback(torch.ops.omni.expert_dispatch.default, add_to_fallback_set=False)(ids, state, layer)
        slots_t, count_t = lookup(state, "replica_slots"), lookup(state, "replica_count")
        check_layer("expert_dispatch", slots_t, count_t, layer)
        row_load_t = lookup(state, "row_load")
        num_experts = count_t.shape[1]
        table = self.constant(state, f"replica_slots_{layer}", slots_t[layer])
        counts = self.constant(state, f"replica_count_{layer}", count_t[layer])
        flat = self.to_int64(self.L[self.aten.view.default](ids, [-1]))
        occurrence = self.occurrence(flat, num_experts)
        replica = self.L[self.aten.remainder.Tensor](occurrence, self.L[self.aten.index.Tensor](counts, [flat]))
        rows = self.L[self.aten.index.Tensor](table, [flat, replica])
        self.accumulate(state, f"row_load_{layer}", row_load_t[layer], rows)
        rows = self.L[torch.ops.prims.convert_element_type.default](rows, ids.get_dtype())
        return self.L[self.aten.view.default](rows, list(ids.get_size()))

    def record(self, ids, state: int, layer: int):
        if not enabled() or not _constants(state, layer):
            return self.fallback(torch.ops.omni.record_expert_load.default, add_to_fallback_set=False)(ids, state, layer)
        load_t = lookup(state, "expert_load")
        check_layer_rows("record_expert_load", load_t, layer)
        flat = self.to_int64(self.L[self.aten.view.default](ids, [-1]))
        self.accumulate(state, f"expert_load_{layer}", load_t[layer], flat)
        return None

    # ---- pieces ------------------------------------------------------------------------------
    def constant(self, state, name: str, tensor: torch.Tensor):
        return self.V.graph.add_tensor_constant(tensor, name=f"omni_state{state}_{name}")

    def to_int64(self, x):
        if x.get_dtype() == torch.int64:
            return x
        return self.L[torch.ops.prims.convert_element_type.default](x, torch.int64)

    def iota(self, n, like):
        return self.L[torch.ops.prims.iota.default](n, start=0, step=1, dtype=torch.int64,
                                                    device=like.get_device(), requires_grad=False)

    def occurrence(self, flat, num_experts: int):
        """int64 [N]: how many earlier entries of ``flat`` hold the same id."""
        aten, L = self.aten, self.L
        static_n = _static(flat.get_size()[0])
        column = L[aten.unsqueeze.default](flat, 1)
        if static_n is not None and static_n <= PAIRWISE_MAX:
            position = self.iota(static_n, flat)
            earlier = L[aten.lt.Tensor](L[aten.unsqueeze.default](position, 0), L[aten.unsqueeze.default](position, 1))
            same = L[aten.eq.Tensor](column, L[aten.unsqueeze.default](flat, 0))
            both = L[aten.logical_and.default](same, earlier)
            return L[aten.sum.dim_IntList](both, [1], dtype=torch.int64)
        onehot = L[aten.eq.Tensor](column, self.iota(num_experts, flat))
        running = L[aten.cumsum.default](onehot, 0, dtype=torch.int64)
        taken = L[aten.gather.default](running, 1, column)
        return L[aten.sub.Tensor](L[aten.squeeze.dim](taken, 1), 1)

    def accumulate(self, state: int, name: str, counter_t: torch.Tensor, values) -> None:
        """``counter[v] += gate`` for every entry v of ``values``, in place in the graph."""
        aten, L = self.aten, self.L
        counter = self.constant(state, name, counter_t)
        gate = self.constant(state, "gate", lookup(state, "gate"))
        n = _static(values.get_size()[0])
        if n is not None and n * counter_t.numel() <= REDUCE_MAX:
            hits = L[aten.eq.Tensor](L[aten.unsqueeze.default](values, 1), self.iota(counter_t.numel(), values))
            counts = L[aten.sum.dim_IntList](hits, [0], dtype=torch.int64)
            L[aten.copy_.default](counter, L[aten.add.Tensor](counter, L[aten.mul.Tensor](counts, gate)))
            return
        ones = L[aten.expand.default](gate, list(values.get_size()))
        L[aten.index_put_.default](counter, [values], ones, True)


def _constants(state, layer) -> bool:
    """The lowering binds the state's tensors at compile time: only for literal ints (a traced
    function whose handle dynamo made symbolic runs the eager kernel, which reads it per call)."""
    return isinstance(state, int) and isinstance(layer, int)


def _static(size) -> int | None:
    """A size as an int when it is a compile-time constant."""
    try:
        return int(size)
    except TypeError:
        return None
