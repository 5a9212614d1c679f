"""`omni::slot_fused_moe`: vLLM's CPU fused-MoE kernel on the placement's storage rows.

vLLM (CPU) computes a MoE layer's routed experts with ``_C.cpu_fused_moe(output, input, w13,
w2, w13_bias, w2_bias, topk_weights, topk_id, skip_weighted, act, isa)`` on its packed
``[E, ...]`` parameters. The redundant-experts pass swaps that op for this one, which takes
the same arguments plus the placement ``state`` and the MoE ``layer`` and, per call:

1. opens the forward step on MoE layer 0 (``kernels.state.run_step_hooks(state, "begin")``:
   the host sets the count gate, e.g. 0 for warm-up batches);
2. counts the batch's logical ids into ``expert_load[layer]`` (times the gate);
3. maps them to storage rows (``omni::expert_dispatch``'s rule) and counts those into
   ``row_load[layer]``;
4. runs vLLM's kernel on the ``[E + R, ...]`` rows registered for the layer
   (``rows{layer}.w13_weight`` ... in the state; without redundant slots, on the graph's own
   parameters, where row e is expert e);
5. closes the step on the last MoE layer (``"end"``: load files, online rebalancing).

Everything happens inside one call per layer, so a placement applied by a step hook never
meets a half-dispatched layer. vLLM's packing is per expert, so rows of packed tensors are
packed tensors (checked when the rows are built, ``omni_passes.hosts.vllm.model``).
"""

from __future__ import annotations

from typing import Optional

import torch

from kernels.expert_dispatch import count_rows, expert_dispatch_reference
from kernels.expert_load import record_expert_load_reference
from kernels.state import has_tensor, lookup, run_step_hooks


def row_tensor(state: int, layer: int, name: str, fallback: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    key = f"rows{layer}.{name}"
    return lookup(state, key) if has_tensor(state, key) else fallback


SCHEMA = ("slot_fused_moe(Tensor(a0!) output, Tensor input, Tensor w13, Tensor w2, Tensor? w13_bias, "
          "Tensor? w2_bias, Tensor topk_weights, Tensor topk_id, bool skip_weighted, str act, str isa, int state, "
          "int layer) -> ()")
# Registered with the plain library API rather than torch.library.custom_op: this op runs once
# per MoE layer and step inside vLLM, and custom_op's autograd and alias-checking wrappers cost
# about 70 us a call here (the kernel itself takes about 14 us on the tiny model); it is an
# inference-only op, so a CPU kernel and a fake kernel are all it needs.
_library = torch.library.Library("omni", "FRAGMENT")
_library.define(SCHEMA)


# (state, MoE layer) whose rows were built inside the current call (a warm start: module docstring
# of omni_passes.hosts.vllm.runtime); that one call may pass the parameter's old storage.
_rows_built_in_call: set[tuple[int, int]] = set()


def rows_built_in_call(state: int, layers: range) -> None:
    """The host built the storage rows of ``layers`` inside a call of this op: a graph loaded from
    a compile cache calls the op before any pass ran, the host extends vLLM's parameters there,
    and only the next call passes their new views (this one passes the old storage, whose contents
    are the rows' head)."""
    _rows_built_in_call.update((state, layer) for layer in layers)


def _just_extended(state: int, layer: int, param: torch.Tensor, rows: torch.Tensor) -> bool:
    if (state, layer) not in _rows_built_in_call:
        return False
    _rows_built_in_call.discard((state, layer))
    return param.shape == rows[: param.shape[0]].shape and torch.equal(param, rows[: param.shape[0]])


def slot_fused_moe(output: torch.Tensor, input: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   w13_bias: Optional[torch.Tensor], w2_bias: Optional[torch.Tensor], topk_weights: torch.Tensor,
                   topk_id: torch.Tensor, skip_weighted: bool, act: str, isa: str, state: int, layer: int) -> None:
    expert_load = lookup(state, "expert_load")
    w13_rows = row_tensor(state, layer, "w13_weight", None)
    if w13_rows is not None and w13.data_ptr() != w13_rows.data_ptr() and not _just_extended(state, layer, w13, w13_rows):
        raise RuntimeError(f"omni::slot_fused_moe: the expert parameter of MoE layer {layer} is no longer a view of "
                           "its storage rows (was it replaced after compile?); the rows would be stale")
    if layer == 0:
        run_step_hooks(state, "begin")
    gate = lookup(state, "gate")
    record_expert_load_reference(expert_load, topk_id, layer, gate)
    if w13_rows is None:  # no redundant slots: row e is expert e, the parameters are the rows
        rows = topk_id
        w13_rows, w2_rows, b13, b2 = w13, w2, w13_bias, w2_bias
    else:
        rows = expert_dispatch_reference(topk_id, lookup(state, "replica_slots"), lookup(state, "replica_count"), layer)
        w2_rows = row_tensor(state, layer, "w2_weight", None)
        b13 = row_tensor(state, layer, "w13_bias", w13_bias)
        b2 = row_tensor(state, layer, "w2_bias", w2_bias)
    count_rows(lookup(state, "row_load"), gate, rows, layer)
    torch.ops._C.cpu_fused_moe(output, input, w13_rows, w2_rows, b13, b2, topk_weights, rows, skip_weighted, act, isa)
    if layer == expert_load.shape[0] - 1:
        run_step_hooks(state, "end")


_library.impl("slot_fused_moe", slot_fused_moe, "CPU")


@torch.library.register_fake("omni::slot_fused_moe")
def _(output, input, w13, w2, w13_bias, w2_bias, topk_weights, topk_id, skip_weighted, act, isa, state, layer):
    return None
