"""Query positions q_pos [B, Sq] (int64) for the ops that take positions, built from the
attention mask of a matched dense site (one computation per mask)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from omni_passes.fx.attention.emit import Emitter, comes_before, node_device, sym_dim
from omni_passes.fx.attention.masks import mask_is_where_of_bool
from omni_passes.fx.attention.operands import shape_of
from omni_passes.fx.attention.sites import DenseAttention


class QueryPositions:
    """Query positions q_pos [B, Sq] (int64) from attention masks, one computation per mask.

    In a causal mask whose key index j holds position j, the row of the query at p allows
    exactly the keys [0, p], so p = (allowed keys) − 1. ``omni::mask_positions`` computes that
    and, with ``check``, asserts at run time that every row is such a prefix (a left-padded or
    windowed mask would otherwise make an op that takes positions compute something else).
    Layers that each turn one shared bool mask into ``where(cond, 0, -inf)`` share one q_pos.
    SDPA with ``is_causal=True`` and no mask gets 0..Sq−1 (SDPA's causal mask is top-left).
    """

    def __init__(self, graph: fx.Graph, pass_name: str, check: bool = True):
        self.graph = graph
        self.pass_name = pass_name
        self.check = check
        self._built: dict[Any, fx.Node] = {}

    def get(self, emit: Emitter, site: DenseAttention, q: fx.Node, layer: int | None) -> fx.Node:
        """q_pos for ``site`` (q: its 4-D query node), inserted at the emitter's position."""
        source = site.mask.args[0] if site.mask is not None and mask_is_where_of_bool(site.mask) else None
        key = source if source is not None else (site.mask if site.mask is not None else ("causal", shape_of(site.q.node)))
        q_pos = self._built.get(key)
        if q_pos is None or not comes_before(self.graph, q_pos, site.anchor):
            q_pos = self._build(emit, site, q, layer, source)
            self._built[key] = q_pos
        return q_pos

    def _build(self, emit: Emitter, site: DenseAttention, q: fx.Node, layer: int | None,
               source: fx.Node | None) -> fx.Node:
        import kernels.sparse_attention_positions  # noqa: F401  (registers omni::mask_positions)

        B, _, Sq, _ = site.q.shape
        if site.mask is None:
            pos = emit(torch.ops.prims.iota.default, (sym_dim(emit, q, 2, Sq),),
                       {"start": 0, "step": 1, "dtype": torch.int64, "device": node_device(q), "requires_grad": False})
            return emit(torch.ops.aten.expand.default, (emit(torch.ops.aten.unsqueeze.default, (pos, 0)), [sym_dim(emit, q, 0, B), -1]))
        if source is not None:
            allowed = source
        else:
            allowed = site.mask if site.mask_is_bool else emit(torch.ops.aten.eq.Scalar, (site.mask, 0))
        for _ in range(4 - len(shape_of(allowed))):
            allowed = emit(torch.ops.aten.unsqueeze.default, (allowed, 0))
        pos = emit(torch.ops.omni.mask_positions.default,
                   (allowed, self.check, f"omni {self.pass_name} (layer {layer} and any sharing its mask)"))  # [b, Sq]
        if shape_of(pos)[0] != B:
            pos = emit(torch.ops.aten.expand.default, (pos, [sym_dim(emit, q, 0, B), -1]))
        return pos
