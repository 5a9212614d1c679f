"""`omni::record_expert_load`: count tokens per logical expert into a persistent buffer.

``expert_load [L, E]`` (int64) lives outside the graph (``kernels.state``) and is added to in
place, so the placement rebalancer can read and reset it between steps without recompiling.
Each count is multiplied by the state's ``gate`` tensor ([1] int64): a host sets it to 0 for
warm-up batches. The gate is read on the device, so a CUDA graph replay counts exactly like
an eager call. The op returns nothing and is registered as side-effecting, so dead-code
elimination (FX's and Inductor's) keeps it.
"""

from __future__ import annotations

import torch

from kernels.common import check_layer_rows
from kernels.state import lookup


def record_expert_load_reference(expert_load: torch.Tensor, topk_ids: torch.Tensor, layer: int,
                                 gate: torch.Tensor | None = None) -> None:
    """Add ``gate * bincount(topk_ids)`` to ``expert_load[layer]`` in place."""
    check_layer_rows("record_expert_load", expert_load, layer)
    flat = topk_ids.reshape(-1).long()
    row = expert_load[layer]
    ones = gate.expand(flat.numel()) if gate is not None else torch.ones_like(flat, dtype=row.dtype)
    row.index_add_(0, flat, ones)


@torch.library.custom_op("omni::record_expert_load", mutates_args=())
def record_expert_load(topk_ids: torch.Tensor, state: int, layer: int) -> None:
    """Accumulate MoE layer ``layer``'s per-expert token counts of this batch."""
    record_expert_load_reference(lookup(state, "expert_load"), topk_ids, layer, lookup(state, "gate"))


@record_expert_load.register_fake
def _(topk_ids, state, layer):
    return None


torch.fx.node.has_side_effect(torch.ops.omni.record_expert_load.default)
