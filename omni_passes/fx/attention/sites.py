"""What the attention matcher returns: one record per attention site it found, by form, and
the sites it saw but refused (with the reason)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from omni_passes.fx.attention.operands import Operand


@dataclass
class DenseAttention:
    """One softmax attention of a transformers graph (SDPA node or math decomposition)."""

    form: str                       # "sdpa" (op name in `op`) or "math"
    layer: int | None
    output: fx.Node                 # its uses get the new attention output
    output_is_3d: bool              # math: output is the second bmm, [B*H, Sq, Dv]
    q: Operand
    k: Operand
    v: Operand
    scale: float
    mask: fx.Node | None            # bool, or additive float (0 where allowed)
    mask_is_bool: bool
    is_causal: bool
    op: str = ""
    anchor: fx.Node | None = None   # the node whose module stack / position the new op takes

    @property
    def batch_heads(self) -> tuple:
        return self.q.shape[0], self.q.shape[1]


@dataclass
class VllmMlaAttention:
    node: fx.Node                   # auto_functionalized(vllm.unified_mla_attention_with_output)
    layer: int | None
    layer_name: str | None
    kwargs: dict[str, Any]


@dataclass
class AttentionMatch:
    dense: list[DenseAttention] = field(default_factory=list)
    vllm_mla: list[VllmMlaAttention] = field(default_factory=list)
    rejected: list[tuple[int | None, str, fx.Node]] = field(default_factory=list)  # (layer, reason, node)
