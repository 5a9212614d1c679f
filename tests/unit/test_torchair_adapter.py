"""The torchair adapter (Ascend; unverified on hardware): its calling convention on a plain
GraphModule, and a clear error where torch_npu/torchair are absent."""

import importlib.util

import pytest
import torch

from omni_passes.fx.redundant_experts import RedundantExpertDispatchPass
from omni_passes.pass_manager import OmniPassManager
from omni_passes.placement.placement import Placement
from omni_passes.placement.runtime import ExpertPlacementState
from omni_passes.testing.graphs import routed_graph
from omni_passes.torchair_backend import TorchairUnavailable, post_grad_hook, torchair_backend


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
