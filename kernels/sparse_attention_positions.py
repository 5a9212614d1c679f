"""``omni::mask_positions``: query positions from a causal attention mask, checked.

The sparse-attention pass needs each query's absolute position p. In a causal mask whose key
index j holds position j, the row of the query at p allows exactly the keys [0, p], so
p = (allowed keys in the row) − 1. This op computes that and, with ``check``, verifies that
every row really is such a prefix (and that all heads agree): a left-padded or windowed mask
would otherwise make sink+recent attention silently compute something else.

    omni::mask_positions(Tensor allowed, bool check, str context) -> Tensor
        allowed: bool [b, h, Sq, Sk] (True = may attend) -> int64 [b, Sq] (head 0's positions;
        -1 for a row that allows nothing).

The check is ``torch._assert_async``: on CPU it raises a RuntimeError naming ``context``; on
CUDA it is a device-side assert (no host sync, so it runs inside CUDA graphs). An op of its own
rather than inline aten ops because Inductor's CPU code turns a failing inline assert into a
process abort instead of a Python exception.
"""

from __future__ import annotations

import torch

__all__ = ["mask_positions"]


def _validate(allowed: torch.Tensor) -> None:
    if allowed.dtype != torch.bool or allowed.dim() != 4:
        raise ValueError(f"omni::mask_positions: allowed must be a 4-D bool tensor [b, h, Sq, Sk], "
                         f"got {allowed.dtype} of shape {tuple(allowed.shape)}")


@torch.library.custom_op("omni::mask_positions", mutates_args=())
def mask_positions(allowed: torch.Tensor, check: bool, context: str) -> torch.Tensor:
    _validate(allowed)
    last = allowed.sum(-1, dtype=torch.int64) - 1  # [b, h, Sq]
    if check and allowed.numel():
        gap = (allowed[..., 1:] & ~allowed[..., :-1]).any()
        heads_differ = (last != last[:, :1]).any()
        ok = ~(gap | heads_differ)
        torch._assert_async(ok, f"{context}: the attention mask does not allow exactly the keys [0, p] for "
                                "each query (left padding, or a windowed / non-causal mask); sink+recent "
                                "attention would compute something else here")
    return last[:, 0].contiguous()


@mask_positions.register_fake
def _mask_positions_fake(allowed, check, context):
    _validate(allowed)
    return allowed.new_empty(allowed.shape[0], allowed.shape[2], dtype=torch.int64)
