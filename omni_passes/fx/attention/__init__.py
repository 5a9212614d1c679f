"""Find attention in aten-level post-grad graphs, recover its operands, and build its
replacement: what the attention passes (``omni_passes.fx.sparse_attention``,
``omni_passes.fx.latent_attention``) share.

One module per attention form, each matched by data flow and op schema (not model names):

    sdpa.py         SDPA nodes, ``_scaled_dot_product_*_attention`` (transformers on CUDA)
    bmm_softmax.py  the math decomposition bmm ─► softmax ─► bmm (transformers DeepSeek on CPU)
    vllm_mla.py     ``auto_functionalized(vllm.unified_mla_attention_with_output)`` (vLLM)

and what they share:

    operands.py     Operand, shape/dtype of a node, views and scalar scales peeled off
    masks.py        which masks an op that takes positions can reproduce
    sites.py        the match records (DenseAttention, VllmMlaAttention, AttentionMatch)
    matcher.py      find_attention(graph): every site of a graph, by form, with refusals
    emit.py         Emitter (nodes with fake values and the site's module stack), operand_node
    positions.py    QueryPositions: q_pos [B, Sq] from a site's mask, once per mask

The matchers only read the graph. What they return says how to rebuild 4-D q, k, v
(``Operand``), the softmax scale and the mask node; the passes do the rewrite.
"""

from omni_passes.fx.attention.emit import Emitter, comes_before, node_device, operand_node, sym_dim
from omni_passes.fx.attention.masks import is_pure_mask, mask_is_where_of_bool
from omni_passes.fx.attention.matcher import find_attention
from omni_passes.fx.attention.operands import Operand, bind_args, dtype_of, permutation, shape_of
from omni_passes.fx.attention.positions import QueryPositions
from omni_passes.fx.attention.sites import AttentionMatch, DenseAttention, VllmMlaAttention
from omni_passes.fx.attention.vllm_mla import vllm_layer_name

__all__ = [
    "AttentionMatch", "DenseAttention", "Emitter", "Operand", "QueryPositions", "VllmMlaAttention",
    "bind_args", "comes_before", "dtype_of", "find_attention", "is_pure_mask", "mask_is_where_of_bool",
    "node_device", "operand_node", "permutation", "shape_of", "sym_dim", "vllm_layer_name",
]
