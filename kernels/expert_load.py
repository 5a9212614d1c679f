"""`omni::record_expert_load`: count tokens per logical expert into a persistent buffer.

``expert_load [L, E]`` (int64) lives outside the graph (``kernels.state``) and is added to in
place, so the placement rebalancer can read and reset it between steps without recompiling.
The op returns nothing and is registered as side-effecting, so dead-code elimination (FX's
and Inductor's) keeps it.
"""

from __future__ import annotations

import torch

from kernels.common import check_layer_rows
from kernels.state import lookup, record_gate, record_hooks


def record_expert_load_reference(expert_load: torch.Tensor, topk_ids: torch.Tensor, layer: int) -> None:
    """Add ``bincount(topk_ids)`` to ``expert_load[layer]`` in place."""
    check_layer_rows("record_expert_load", expert_load, layer)
    flat = topk_ids.reshape(-1).long()
    row = expert_load[layer]
    row.scatter_add_(0, flat, torch.ones_like(flat, dtype=row.dtype))


@torch.library.custom_op("omni::record_expert_load", mutates_args=())
def record_expert_load(topk_ids: torch.Tensor, state: int, layer: int) -> None:
    """Accumulate MoE layer ``layer``'s per-expert token counts of this batch."""
    gate = record_gate(state)
    if gate is not None and not gate():
        return
    record_expert_load_reference(lookup(state, "expert_load"), topk_ids, layer)
    for hook in record_hooks(state):
        hook(layer)


@record_expert_load.register_fake
def _(topk_ids, state, layer):
    return None


torch.fx.node.has_side_effect(torch.ops.omni.record_expert_load.default)
