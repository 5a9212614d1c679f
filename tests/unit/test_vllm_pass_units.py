"""The vLLM entry points without starting an engine: the compile-config attribute, uuid
covering the configuration, clear errors, and the vllm-ascend adapter's calling convention
on a plain GraphModule (vllm-ascend may pass a GraphModule instead of a Graph)."""

import json

import numpy as np
import pytest
import torch

import omni_passes
from omni_passes.config import ConfigError
from omni_passes.vllm_pass import VllmPostGradPass

from omni_passes.testing.graphs import routed_graph


def write_config(tmp_path, data, name="passes.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_attribute_is_a_real_module_attribute():
    # vLLM resolves the qualified name with __import__(pkg).__dict__[attr].
    assert isinstance(__import__("omni_passes").__dict__["vllm_post_grad_pass"], VllmPostGradPass)


def test_uuid_covers_configuration(tmp_path, monkeypatch):
    a = write_config(tmp_path, {"passes": ["redundant_experts"]}, "a.json")
    b = write_config(tmp_path, {"passes": ["redundant_experts"], "expert_load_interval_steps": 7}, "b.json")
    monkeypatch.setenv("OMNI_PASSES_CONFIG", str(a))
    uuid_a = omni_passes.vllm_post_grad_pass.uuid()
    monkeypatch.setenv("OMNI_PASSES_CONFIG", str(b))
    uuid_b = omni_passes.vllm_post_grad_pass.uuid()
    assert uuid_a != uuid_b
    assert uuid_a.split(":")[1] != uuid_b.split(":")[1]  # the config part differs, not only the nonce


def test_uuid_fails_with_a_message_naming_the_problem(tmp_path, monkeypatch):
    monkeypatch.delenv("OMNI_PASSES_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="OMNI_PASSES_CONFIG is not set"):
        omni_passes.vllm_post_grad_pass.uuid()
    monkeypatch.setenv("OMNI_PASSES_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="missing.json: file does not exist"):
        omni_passes.vllm_post_grad_pass.uuid()


def test_pass_is_picklable_without_state():
    import pickle

    clone = pickle.loads(pickle.dumps(omni_passes.vllm_post_grad_pass))
    assert isinstance(clone, VllmPostGradPass) and clone.runtime is None


def test_vllm_ascend_adapter_on_a_plain_graph_module(tmp_path, monkeypatch):
    from vllm.config import VllmConfig

    from omni_passes.vllm_ascend_pass import OmniAscendPass
    from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass

    loads = tmp_path / "loads.npy"
    config = write_config(tmp_path, {"passes": ["redundant_experts"], "report_path": str(tmp_path / "r.json"),
                                     "expert_load_path": str(loads), "expert_load_interval_steps": 1})
    monkeypatch.setenv("OMNI_PASSES_CONFIG", str(config))
    assert issubclass(OmniAscendPass, VllmInductorPass)
    gm = routed_graph()
    ascend_pass = OmniAscendPass(VllmConfig())
    returned = ascend_pass(gm)
    assert returned is gm
    assert "omni.expert_dispatch" in gm.code
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passes"]["redundant_experts"]["matched_layers"] == [0]
    # the rewritten module runs and records loads through the same state
    x, gate = torch.randn(6, 8), torch.randn(8, 4)
    weights = torch.randn(4, 8, 8, dtype=torch.bfloat16)
    gm(x, gate, weights)
    assert int(ascend_pass.runtime.state.expert_load.sum()) == 6 * 2
    assert np.load(loads).sum() == 6 * 2
