"""Small aten-level graphs for testing passes without building a model."""

import torch


def routed_graph():
    """A minimal aten-level MoE: top-k ids feed a grouped GEMM through sort/histc/cumsum."""
    experts, top_k, hidden = 4, 2, 8

    def moe(x, gate, weights):
        scores = (x @ gate).sigmoid()
        _, ids = torch.topk(scores, top_k)
        routing = scores.gather(1, ids)
        flat = ids.reshape(-1)
        sorted_ids, perm = torch.sort(flat)
        counts = torch.histc(sorted_ids.float(), bins=experts, min=0, max=experts - 1)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        out = torch._grouped_mm(x[perm // top_k].to(torch.bfloat16), weights, offs=offsets)
        return out.float().sum() + routing.sum()

    x, gate = torch.randn(6, hidden), torch.randn(hidden, experts)
    weights = torch.randn(experts, hidden, hidden, dtype=torch.bfloat16)
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(moe, tracing_mode="fake")(x, gate, weights)
