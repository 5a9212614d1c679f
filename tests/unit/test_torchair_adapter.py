"""The Ascend adapters without torchair: the torchair hook's calling convention on a plain
GraphModule, refusals with messages (no torch_npu, a torchair without the hook, a hook already
taken), and the vllm-ascend pass building its state under an active FakeTensorMode (as
vllm-ascend calls it). torchair's and vllm-ascend's real code runs in
tests/integration/test_torchair.py and test_vllm_ascend_pass.py."""

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

from omni_passes.fx.redundant_experts import RedundantExpertDispatchPass
from omni_passes.pass_manager import OmniPassManager
from omni_passes.placement.placement import Placement
from omni_passes.placement.controller import PlacementController
from omni_passes.testing.graphs import routed_graph
from omni_passes.hosts.torchair import TorchairUnavailable, install_hook, post_grad_hook, torchair_backend


def test_hook_calling_convention_rewrites_a_graph_module():
    gm = routed_graph()
    state = PlacementController(Placement.identity(1, 4), layout="slot")
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


def test_torchair_without_the_hook_is_refused_naming_the_supported_versions():
    class CompilerConfig:  # torchair before 2.9: the option does not exist at top level
        experimental_config = SimpleNamespace()

    with pytest.raises(TorchairUnavailable, match=r"no CompilerConfig.post_grad_custom_post_pass.*2\.9 to 2\.14"):
        install_hook(CompilerConfig(), OmniPassManager([], fingerprint="x"))


def test_a_hook_already_set_is_not_replaced():
    def theirs(gm, example_inputs, config):
        return gm

    config = SimpleNamespace(post_grad_custom_post_pass=SimpleNamespace(value=theirs))
    with pytest.raises(TorchairUnavailable, match="already set"):
        install_hook(config, OmniPassManager([], fingerprint="x"))


def test_vllm_ascend_pass_builds_its_state_under_an_active_fake_mode(tmp_path, monkeypatch):
    """vllm-ascend calls graph passes inside aot_autograd's forward compiler, with its
    FakeTensorMode active; the placement state must still be real tensors."""
    from torch._subclasses.fake_tensor import FakeTensor

    from omni_passes.hosts.vllm.ascend_pass import OmniAscendPass
    from omni_passes.hosts.vllm.runtime import VllmRuntime
    from omni_passes.hosts.vllm.settings import process_config

    config = tmp_path / "passes.json"
    config.write_text(json.dumps({"passes": ["redundant_experts"], "report_path": str(tmp_path / "r.json")}))
    monkeypatch.setenv("OMNI_PASSES_CONFIG", str(config))
    gm = routed_graph()
    # the graph's own fake mode, active, as aot_autograd has it while its forward compiler runs
    fake_mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])
    assert isinstance(fake_mode, FakeTensorMode)
    with fake_mode:
        with pytest.raises(Exception, match="DataDependentOutput|data-dependent|_local_scalar_dense"):
            VllmRuntime.create(gm.graph, process_config())  # what the fix avoids: tables computed on fake tensors
        ascend_pass = OmniAscendPass()
        returned = ascend_pass(gm)
    assert returned is gm and "omni.expert_dispatch" in gm.code
    state = ascend_pass.runtime.controller
    assert not isinstance(state.replica_slots, FakeTensor) and not isinstance(state.expert_load, FakeTensor)
    assert torch.equal(state.replica_slots[0, :, 0], torch.arange(4))
    assert json.loads((tmp_path / "r.json").read_text())["passes"]["redundant_experts"]["matched_layers"] == [0]


def test_sources_unpack_only_python_and_say_what_failed(tmp_path):
    """make install's unpack step: the package's Python, no native libraries, no dist-info
    (no entry points); a broken or unexpected wheel is named in the error."""
    import zipfile

    from omni_passes.testing.ascend_sources import TORCH_NPU, FetchError, sys_path_entry, unpack

    wheel = tmp_path / "torch_npu-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("torch_npu/dynamo/torchair/__init__.py", "x = 1\n")
        archive.writestr("torch_npu/dynamo/torchair/core/_torchair.so", b"\x7fELF")
        archive.writestr("torch_npu/__init__.py", "raise ImportError\n")
        archive.writestr("torch_npu-2.13.0.dist-info/entry_points.txt", "[torch.backends]\n")
    dest = tmp_path / "dest"
    assert unpack(wheel, dest, TORCH_NPU) == 1
    root = sys_path_entry(dest, TORCH_NPU)
    assert (root / "torchair" / "__init__.py").read_text() == "x = 1\n"
    assert not (root / "torchair" / "core" / "_torchair.so").exists()
    assert not list(dest.rglob("*.dist-info")) and not (root.parent / "__init__.py").exists()

    broken = tmp_path / "torch_npu-2.13.0-broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(FetchError, match="torch_npu-2.13.0-broken.whl is not a readable wheel"):
        unpack(broken, dest, TORCH_NPU)
    empty = tmp_path / "torch_npu-2.13.0-empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("other/file.py", "")
    with pytest.raises(FetchError, match="has no files under torch_npu/dynamo/torchair/"):
        unpack(empty, dest, TORCH_NPU)
