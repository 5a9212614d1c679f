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
