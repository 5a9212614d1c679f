"""Which attention masks the sink + recent and latent ops can reproduce: a bool mask, or an
additive float mask that is exactly 0 where allowed and very negative where blocked (so
``mask == 0`` means "attend"). A general float bias (ALiBi, relative positions) is not one."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from omni_passes.fx.attention.operands import VIEW_OPS, dtype_of, scalar, shape_of
from omni_passes.fx.utils import is_op

# A blocked value at or below this is a mask, not a bias (bf16's -inf stand-ins are ~ -3e38).
BLOCKED_AT_MOST = -1e4


def is_pure_mask(mask: fx.Node, max_hops: int = 8) -> bool:
    """True when an additive float mask is ``where(cond, 0, c)`` with c <= -1e4 or -inf,
    seen through views/slices/casts: then ``mask == 0`` is exactly "attend"."""
    node = mask
    for _ in range(max_hops):
        if not isinstance(node, fx.Node):
            return False
        if dtype_of(node) == torch.bool:
            return True
        if is_op(node, "aten.where"):
            allowed_value = const_value(node.args[1])
            blocked_value = const_value(node.args[2])
            return allowed_value == 0.0 and blocked_value is not None and blocked_value <= BLOCKED_AT_MOST
        if is_op(node, *VIEW_OPS, "aten.slice", "aten.unsqueeze", "aten.squeeze", "aten.select",
                 "prims.convert_element_type", "aten._to_copy"):
            node = node.args[0]
            continue
        # SDPA's memory-efficient kernel pads a bias to a multiple of 16 keys (then slices it
        # back): padding with 0 keeps the values in {0, blocked}.
        if is_op(node, "aten.constant_pad_nd") and const_value(node.args[2] if len(node.args) > 2 else 0.0) == 0.0:
            node = node.args[0]
            continue
        return False
    return False


def mask_is_where_of_bool(mask: Any) -> bool:
    """``where(cond, 0, c)`` with a bool ``cond`` of the mask's own shape and c <= -1e4."""
    if not (isinstance(mask, fx.Node) and is_op(mask, "aten.where")):
        return False
    cond = mask.args[0]
    blocked = const_value(mask.args[2])
    return (dtype_of(cond) == torch.bool and shape_of(cond) == shape_of(mask)
            and const_value(mask.args[1]) == 0.0 and blocked is not None and blocked <= BLOCKED_AT_MOST)


def const_value(arg: Any) -> float | None:
    """A scalar constant: a Python number or an ``aten.full([], value)`` / ``scalar_tensor`` node."""
    if scalar(arg) is not None:
        return scalar(arg)
    if isinstance(arg, fx.Node) and is_op(arg, "aten.full") and scalar(arg.args[1]) is not None:
        return scalar(arg.args[1])
    if isinstance(arg, fx.Node) and is_op(arg, "aten.scalar_tensor") and scalar(arg.args[0]) is not None:
        return scalar(arg.args[0])
    return None
