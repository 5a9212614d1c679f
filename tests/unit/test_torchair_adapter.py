"""The torchair adapter (Ascend; unverified on hardware): its calling convention on a plain
GraphModule, and a clear error where torch_npu/torchair are absent."""

import importlib.util

import pytest
import torch

from omni_passes.fx.redundant_experts import RedundantExpertDispatchPass
from omni_passes.pass_manager import OmniPassManager
from omni_passes.placement.placement import Placement
from omni_passes.placement.runtime import ExpertPlacementState
from omni_passes.torchair_backend import TorchairUnavailable, post_grad_hook, torchair_backend


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


def test_hook_calling_convention_rewrites_a_graph_module():
    gm = routed_graph()
    state = ExpertPlacementState(Placement.identity(1, 4))
    manager = OmniPassManager([RedundantExpertDispatchPass(state)], fingerprint="test")
    hook = post_grad_hook(manager)
    returned = hook(gm, [], None)
    assert returned is gm
    targets = [str(n.target) for n in gm.graph.nodes]
    assert "omni.expert_dispatch.default" in targets
    assert "omni.record_expert_load.default" in targets
    assert manager.report()["passes"]["redundant_experts"]["matched_layers"] == [0]
    assert "expert_dispatch" in gm.code  # recompiled


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu present")
def test_without_torch_npu_the_error_says_what_is_missing():
    manager = OmniPassManager([], fingerprint="x")
    with pytest.raises(TorchairUnavailable, match="needs torch_npu and torchair"):
        torchair_backend(manager)
