"""Grouped GEMM over a rank's local expert slots, compilable for every dtype.

``torch._grouped_mm`` is the fast path (CUTLASS on Hopper, a CPU kernel too) but its meta
kernel accepts only bfloat16 with 16-byte-aligned strides, so under torch.compile other dtypes
(float32 tests) would break the graph. For those, ``omni_ep::grouped_mm`` is an opaque custom
op (a loop of ``mm`` over groups, one host sync for the offsets) with a fake kernel, so the
surrounding region still compiles as one graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("omni_ep::grouped_mm", mutates_args=())
def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x [N, K]`` rows sorted by group, ``w [G, K, M]``, ``offs [G]`` int32 end offsets →
    ``[N, M]``; rows past ``offs[-1]`` are zero."""
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for group, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[group], out=out[start:end])
        start = end
    return out


@grouped_mm_loop.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


def _native_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    # 16-byte strides for both operands (8 bf16 elements).
    return x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``[N, K] x [G, K, M]`` by groups of rows; rows past ``offs[-1]`` are undefined."""
    if _native_ok(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    return grouped_mm_loop(x, w, offs)


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """SiLU-gated expert MLP on rows grouped by slot.

    Args:
        x: ``[N, H]`` rows sorted by slot; gate_up: ``[S, 2I, H]``; down: ``[S, H, I]``;
        offs: int32 ``[S]`` cumulative row counts per slot.

    Returns:
        ``[N, H]`` (rows past ``offs[-1]`` undefined).
    """
    hidden = grouped_mm(x, gate_up.transpose(1, 2), offs)
    gate, up = hidden.chunk(2, dim=-1)
    return grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs)
