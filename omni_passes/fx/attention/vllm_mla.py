"""Form 3: vLLM MLA (vLLM on CPU)::

    auto_functionalized(vllm.unified_mla_attention_with_output,
                        q=, kv_c_normed=, k_pe=, output=, layer_name=, ...)

The layer is named by the ``layer_name`` graph input (``meta["val"].real_obj.value ==
"model.layers.N.self_attn.attn"``) or a string constant. vLLM's other attention ops are seen
and refused (this pass family handles DeepSeek's MLA). Only the graph form is known here; the
op that replaces it comes from the vLLM host.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from omni_passes.fx.attention.sites import VllmMlaAttention
from omni_passes.fx.utils import layer_index
from omni_passes.layer_names import decoder_layer_index

VLLM_MLA_OP = "vllm.unified_mla_attention_with_output"
VLLM_MHA_OPS = ("vllm.unified_attention_with_output", "vllm.unified_attention")


def vllm_layer_name(arg: Any) -> str | None:
    """The layer name vLLM passes its attention op: a string, or a graph input whose fake
    value wraps vLLM's opaque LayerName object."""
    if isinstance(arg, str):
        return arg
    if isinstance(arg, fx.Node):
        value = arg.meta.get("val")
        for attr in ("real_obj", "wrapped_obj"):
            obj = getattr(value, attr, None)
            name = getattr(obj, "value", None)
            if isinstance(name, str):
                return name
    return None


def match_vllm_mla(node: fx.Node) -> VllmMlaAttention:
    """The site of one ``auto_functionalized`` vLLM MLA call."""
    kwargs = dict(node.kwargs)
    name = vllm_layer_name(kwargs.get("layer_name"))
    layer = None
    if name:
        layer = decoder_layer_index(name)
    if layer is None:
        layer = layer_index(node)
    return VllmMlaAttention(node=node, layer=layer, layer_name=name, kwargs=kwargs)
