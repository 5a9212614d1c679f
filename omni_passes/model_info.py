"""What the passes need to know about a MoE causal LM, and what they cannot rewrite in it.

Read from a HuggingFace-style config (transformers or vLLM) or, where only the graph is at
hand, from the graph. Families differ in how a config says which decoder layers are MoE:

    DeepSeek-V2/V3, GLM-4-MoE, dots1   layer >= first_k_dense_replace (and % moe_layer_freq)
    Qwen2/3-MoE                        not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0
    ERNIE-4.5-MoE                      (layer + 1) % moe_layer_interval == 0, within start..end index
    newer configs                      mlp_layer_types[layer] == "sparse"
    Mixtral, GPT-OSS, OLMoE, ...       every layer

``moe_layers_in_model`` reads the same fact off a built model (the decoder layers holding an
experts module); the CLI refuses a model where the two disagree, since placement rows would
then be bound to the wrong layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from omni_passes.layer_names import decoder_layer_index

EXPERT_COUNT_FIELDS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")


def _get(config: Any, *names: str, default: Any = None) -> Any:
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)


def num_routed_experts(config: Any) -> int:
    """Routed (logical) experts per MoE layer; 0 for a dense model."""
    value = _get(config, *EXPERT_COUNT_FIELDS, default=0)
    return int(value[0] if isinstance(value, (list, tuple)) else value or 0)


def moe_layer_ids(config: Any) -> tuple[int, ...]:
    """Decoder-layer indices of the MoE layers, in model order, as transformers builds them."""
    layers = int(_get(config, "num_hidden_layers", default=0))
    if not num_routed_experts(config):
        return ()
    kinds = getattr(config, "mlp_layer_types", None)
    if isinstance(kinds, (list, tuple)):
        return tuple(i for i, kind in enumerate(kinds[:layers]) if kind in ("sparse", "moe"))
    if getattr(config, "decoder_sparse_step", None) is not None:
        dense = set(getattr(config, "mlp_only_layers", None) or ())
        step = int(config.decoder_sparse_step) or 1
        return tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
    if getattr(config, "moe_layer_interval", None) is not None:
        start = int(_get(config, "moe_layer_start_index", default=0))
        end = int(_get(config, "moe_layer_end_index", default=layers - 1))
        end = layers - 1 if end < 0 else end
        step = int(config.moe_layer_interval) or 1
        return tuple(i for i in range(layers) if (i + 1) % step == 0 and start <= i <= end)
    first_dense = int(_get(config, "first_k_dense_replace", default=0))
    freq = int(_get(config, "moe_layer_freq", default=1) or 1)
    return tuple(i for i in range(layers) if i >= first_dense and i % freq == 0)


@dataclass(frozen=True)
class MoEModelInfo:
    num_layers: int
    moe_layer_ids: tuple[int, ...]   # decoder-layer index of each MoE layer, in model order
    num_experts: int                 # routed (logical) experts per MoE layer
    top_k: int
    n_group: int

    @classmethod
    def from_hf_config(cls, config: Any) -> "MoEModelInfo":
        return cls(
            num_layers=int(_get(config, "num_hidden_layers")),
            moe_layer_ids=moe_layer_ids(config),
            num_experts=num_routed_experts(config),
            top_k=int(_get(config, "num_experts_per_tok", "moe_k", default=0) or 0),
            n_group=int(_get(config, "n_group", default=1) or 1),
        )


def experts_modules(model: Any) -> dict[int, Any]:
    """Decoder-layer index → the module holding that layer's routed experts: stacked
    ``[E, ...]`` tensors (``gate_up_proj`` or ``up_proj``) and a ``num_experts``."""
    found = {}
    for name, module in model.named_modules():
        layer = decoder_layer_index(name)
        weight = getattr(module, "gate_up_proj", None)
        weight = getattr(module, "up_proj", None) if weight is None else weight
        if layer is not None and hasattr(module, "num_experts") and getattr(weight, "dim", lambda: 0)() == 3:
            found.setdefault(layer, module)
    return found


def dispatch_refusal(model: Any) -> str | None:
    """Why the dispatch pass cannot rewrite this model safely, or None when it can.

    The pass rewrites the expert-selection top-k where its ids reach a grouped GEMM; slots are
    materialised by re-indexing stacked ``[E, ...]`` tensors. Both need transformers' experts
    interface (``use_experts_implementation``: stacked weights, ``grouped_mm`` forward)."""
    config = model.config
    expected = moe_layer_ids(config)
    if not expected:
        return None
    kind = type(model).__name__
    found = experts_modules(model)
    if not found:
        return (f"{kind}: its experts are not stacked [E, ...] tensors behind transformers' experts interface "
                "(a loop over per-expert modules has no grouped GEMM to dispatch into, and no tensor to re-slot)")
    if tuple(sorted(found)) != expected:
        return (f"{kind}: the config's fields say MoE layers {list(expected)} but the model has experts in "
                f"layers {sorted(found)}; placement rows would be bound to the wrong layers")
    plain = [i for i, m in sorted(found.items()) if not hasattr(m, "is_transposed")]
    if plain:
        return (f"{kind}: the experts of layers {plain} do not use transformers' experts interface, "
                "so they cannot run as one grouped GEMM over slots")
    return None


def attention_refusals(model: Any, layers: list[int] | tuple[int, ...]) -> dict[int, str]:
    """Decoder layer → why sink+recent attention cannot replace its attention (only layers
    it cannot: MLA and plain causal SDPA attention are rewritten).

    Sliding-window layers never see position 0 once the window has moved, so keeping a sink
    would attend to keys the model masks out. Sink logits (GPT-OSS: a learned per-head term
    in the softmax denominator) have no place in the op. Other layer types (linear, chunked)
    are not softmax attention over the cache."""
    from omni_passes.kvcache.attention import attention_modules

    config = model.config
    modules = attention_modules(model)
    types = getattr(config, "layer_types", None)
    refused = {}
    for layer in layers:
        module = modules.get(layer)
        kind = types[layer] if isinstance(types, (list, tuple)) and layer < len(types) else None
        window = getattr(module, "sliding_window", None) if module is not None else None
        if kind is None and window is None:
            window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        reasons = []
        if kind not in (None, "full_attention", "sliding_attention"):
            reasons.append(f"{kind!r} layer: not softmax attention over a KV cache")
        if kind == "sliding_attention" or window:
            reasons.append(f"sliding-window attention (window {window or config.sliding_window}): once the window "
                           "moves the layer never sees the first positions, so a sink would attend to masked keys")
        if module is not None and getattr(module, "sinks", None) is not None:
            reasons.append(f"learned attention-sink logits ({type(module).__name__}.sinks, an extra per-head term "
                           "in the softmax): sink+recent attention has no place for them")
        if reasons:
            refused[layer] = "; ".join(reasons)
    return refused


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
