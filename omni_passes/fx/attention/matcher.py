"""``find_attention(graph)``: every attention site of a post-grad graph, by form (one pass
over the graph; each form's matcher decides from data flow and op schema, never model names).
"""

from __future__ import annotations

import torch.fx as fx

from omni_passes.fx.attention.bmm_softmax import match_bmm_softmax
from omni_passes.fx.attention.sdpa import SDPA_OPS, match_sdpa
from omni_passes.fx.attention.sites import AttentionMatch, DenseAttention
from omni_passes.fx.attention.vllm_mla import VLLM_MHA_OPS, VLLM_MLA_OP, match_vllm_mla
from omni_passes.fx.utils import functionalized_op, is_op, layer_index


def find_attention(graph: fx.Graph) -> AttentionMatch:
    """Dense sites (SDPA nodes, bmm-softmax-bmm), vLLM MLA sites, and refused sites with reasons."""
    match = AttentionMatch()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        inner = functionalized_op(node)
        if inner is not None:
            if inner.startswith(VLLM_MLA_OP):
                match.vllm_mla.append(match_vllm_mla(node))
            elif any(inner.startswith(name) for name in VLLM_MHA_OPS):
                match.rejected.append((layer_index(node), f"{inner}: vLLM non-MLA attention is not supported "
                                                         "(this pass handles DeepSeek's MLA)", node))
            continue
        if is_op(node, *SDPA_OPS):
            found = match_sdpa(node)
        elif is_op(node, "aten.bmm"):
            found = match_bmm_softmax(node)
        else:
            continue
        if isinstance(found, DenseAttention):
            match.dense.append(found)
        elif isinstance(found, str):
            match.rejected.append((layer_index(node), found, node))
    return match
