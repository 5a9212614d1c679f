"""Form 1: SDPA nodes (transformers on CUDA, or on CPU when q/k and v head dims agree)::

    q, k, v, mask ─► aten._scaled_dot_product_{cudnn,efficient,flash,flash_for_cpu}_attention
                     ─► getitem[0]  [B, Hq, Sq, Dv]

Refused (with the reason): dropout, heads that are not MHA/GQA, unknown shapes, and a used
log-sum-exp / RNG-state output (a backward pass needs it; the sparse op does not make it).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from omni_passes.fx.attention.operands import Operand, bind_args, dtype_of, shape_of
from omni_passes.fx.attention.sites import DenseAttention
from omni_passes.fx.utils import layer_index, target_name

SDPA_OPS = (
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten.scaled_dot_product_attention",
)


def match_sdpa(node: fx.Node) -> DenseAttention | str:
    """The site of one SDPA node, or the reason it is refused."""
    args = bind_args(node)
    op = target_name(node).rsplit(".", 1)[0]
    q, k, v = args["query"], args["key"], args["value"]
    qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
    if not (qs and ks and vs) or len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return f"{op}: q/k/v are not 4-D tensors with known shapes"
    dropout = args.get("dropout_p") or 0.0
    if dropout:
        return f"{op}: dropout_p={dropout} (training graph); the sparse op has no dropout"
    if ks[1] != vs[1] or qs[1] % ks[1] != 0:
        return f"{op}: head counts q {qs[1]}, k {ks[1]}, v {vs[1]} are not MHA/GQA"
    # Outputs other than the attention output (log-sum-exp, RNG state) must be unused.
    if node.target is torch.ops.aten.scaled_dot_product_attention.default:
        output = node
    else:
        output = None
        for user in node.users:
            if user.target is operator.getitem and user.args[1] == 0:
                output = user
            elif user.target is operator.getitem and user.users:
                return f"{op}: output #{user.args[1]} (log-sum-exp / RNG state) is used, e.g. by a backward pass"
        if output is None:
            return f"{op}: attention output is unused"
    mask = args.get("attn_mask", args.get("attn_bias"))
    scale = args.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(qs[-1])
    return DenseAttention(
        form="sdpa", op=op, layer=layer_index(node), output=output, output_is_3d=False,
        q=Operand(q, qs), k=Operand(k, ks), v=Operand(v, vs), scale=float(scale), mask=mask,
        mask_is_bool=dtype_of(mask) == torch.bool if mask is not None else False,
        is_causal=bool(args.get("is_causal")), anchor=node,
    )
