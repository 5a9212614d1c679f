"""What the passes need to know about a DeepSeek model: which decoder layers are MoE, how
many routed experts, top-k. Read from a HuggingFace-style config (transformers or vLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MoEModelInfo:
    num_layers: int
    moe_layer_ids: tuple[int, ...]   # decoder-layer index of each MoE layer, in model order
    num_experts: int                 # routed (logical) experts per MoE layer
    top_k: int
    n_group: int

    @classmethod
    def from_hf_config(cls, config: Any) -> "MoEModelInfo":
        get = lambda *names, default=None: next(  # noqa: E731
            (getattr(config, n) for n in names if getattr(config, n, None) is not None), default
        )
        num_layers = int(get("num_hidden_layers"))
        num_experts = int(get("n_routed_experts", "num_local_experts", "num_experts", default=0) or 0)
        first_dense = int(get("first_k_dense_replace", default=0))
        freq = int(get("moe_layer_freq", default=1) or 1)
        moe = tuple(i for i in range(num_layers) if num_experts and i >= first_dense and i % freq == 0)
        return cls(
            num_layers=num_layers,
            moe_layer_ids=moe,
            num_experts=num_experts,
            top_k=int(get("num_experts_per_tok", default=0) or 0),
            n_group=int(get("n_group", default=1) or 1),
        )


def info_from_graph(graph) -> MoEModelInfo:
    """The same facts read off a graph, for hosts that do not hand the passes a model config
    (vLLM compiles in a worker where its config is not current). MoE layers are the decoder
    layers whose expert-selection top-k the matcher finds; decoder layers are counted from
    the module paths recorded on attention nodes."""
    from omni_passes.fx.moe_matcher import find_moe_routes, is_attention
    from omni_passes.fx.utils import layer_index

    routes = find_moe_routes(graph).routes
    layers = sorted({r.layer for r in routes if r.layer is not None})
    experts = {r.num_logical_experts for r in routes} - {None}
    top_k = {int(r.ids.meta["val"].shape[-1]) for r in routes if "val" in r.ids.meta}
    attention_layers = [layer_index(n) for n in graph.nodes if is_attention(n)]
    known = [i for i in attention_layers + layers if i is not None]
    return MoEModelInfo(
        num_layers=(max(known) + 1) if known else 0,
        moe_layer_ids=tuple(layers),
        num_experts=experts.pop() if len(experts) == 1 else 0,
        top_k=top_k.pop() if len(top_k) == 1 else 0,
        n_group=1,
    )
