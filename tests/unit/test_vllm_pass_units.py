"""The vLLM entry points without starting an engine: the compile-config attribute, uuid
covering the configuration, clear errors, and the vllm-ascend adapter's calling convention
on a plain GraphModule (vllm-ascend may pass a GraphModule instead of a Graph)."""

import json

import numpy as np
import pytest
import torch

import omni_passes
from omni_passes.config import ConfigError
from omni_passes.hosts.vllm.post_grad_pass import VllmPostGradPass

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

    from omni_passes.hosts.vllm.ascend_pass import OmniAscendPass
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
    assert int(ascend_pass.runtime.controller.expert_load.sum()) == 6 * 2
    ascend_pass.runtime.close()  # no per-step hook in this graph form: the file is written at close
    assert np.load(loads).sum() == 6 * 2


def test_refused_setup_names_the_file_and_fails_every_later_graph_at_once(tmp_path, monkeypatch):
    from omni_passes.hosts.vllm.post_grad_pass import VllmPassSetupError

    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"num_layers": 2, "num_logical_experts": 8, "num_ranks": 1, "num_nodes": 1,
                                     "slots_per_rank": 8, "phy2log": [list(range(8))] * 2}))
    config = write_config(tmp_path, {"passes": ["redundant_experts"], "placement": str(placement)})
    monkeypatch.setenv("OMNI_PASSES_CONFIG", str(config))
    vllm_pass = VllmPostGradPass()
    for _ in range(2):
        with pytest.raises(VllmPassSetupError) as info:
            vllm_pass(routed_graph().graph)
        assert f"placement file {placement} is for 2 MoE layers x 8 experts" in str(info.value)
        assert "x 4 routed experts" in str(info.value)
    assert vllm_pass.runtime is None


def test_redundant_slots_without_vllm_layers_are_refused_with_the_reason(tmp_path, monkeypatch):
    from omni_passes.hosts.vllm.post_grad_pass import VllmPassSetupError

    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"num_layers": 1, "num_logical_experts": 4, "num_ranks": 1, "num_nodes": 1,
                                     "slots_per_rank": 6, "phy2log": [[0, 1, 2, 3, 0, 0]]}))
    monkeypatch.setenv("OMNI_PASSES_CONFIG", str(write_config(tmp_path, {"passes": ["redundant_experts"], "placement": str(placement)})))
    with pytest.raises(VllmPassSetupError, match="2 redundant slots per MoE layer refused: no vLLM forward context"):
        VllmPostGradPass()(routed_graph().graph)


def test_slot_fused_moe_on_rows_equals_vllm_kernel_on_experts():
    """omni::slot_fused_moe with replica rows (packed rows copied from vLLM's packed experts)
    gives vLLM's cpu_fused_moe output bit for bit, and counts experts and rows."""
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C.*)

    from kernels.state import add_tensors
    from omni_passes.placement.controller import PlacementController
    from omni_passes.placement.materialize import ExpertRows, extend_rows
    from omni_passes.testing.placements import redundant_permuted

    E, H, I, T, K = 8, 32, 32, 13, 2
    g = torch.Generator().manual_seed(0)
    w13 = torch.ops._C.prepack_moe_weight
    packed13, packed2 = torch.empty(E, 2 * I, H), torch.empty(E, H, I)
    w13(torch.randn(E, 2 * I, H, generator=g) / 8, packed13, "vec")
    w13(torch.randn(E, H, I, generator=g) / 8, packed2, "vec")
    x = torch.randn(T, H, generator=g)
    ids = torch.randint(0, E, (T, K), generator=g, dtype=torch.int64)
    ids[:, 0] = 3  # hot
    weights = torch.rand(T, K, generator=g)
    expected = torch.empty(T, H)
    torch.ops._C.cpu_fused_moe(expected, x, packed13, packed2, None, None, weights, ids.int(), False, "silu", "vec")
    p = redundant_permuted(1, E, 5, g, hot=torch.tensor([[3, 3, 3, 1, 2]]))

    def rows(layout):
        return ExpertRows([{"w13_weight": extend_rows(packed13, layout.row_expert[0]),
                            "w2_weight": extend_rows(packed2, layout.row_expert[0])}], layout, E)

    controller = PlacementController(p, rows=rows)
    storage = controller.weights.storage[0]
    head13, head2 = storage["w13_weight"][:E], storage["w2_weight"][:E]  # what vLLM's parameters become
    out = torch.empty(T, H)
    torch.ops.omni.slot_fused_moe(out, x, head13, head2, None, None, weights, ids.int(), False, "silu", "vec",
                                  controller.handle, 0)
    assert torch.equal(out, expected)
    with pytest.raises(RuntimeError, match="no longer a view of its storage rows"):  # a parameter replaced behind our back
        torch.ops.omni.slot_fused_moe(out, x, packed13, packed2, None, None, weights, ids.int(), False, "silu", "vec",
                                      controller.handle, 0)
    assert torch.equal(controller.expert_load[0], torch.bincount(ids.flatten(), minlength=E))
    slots = controller.total_slot_load()[0]
    hot_slots = (p.phy2log[0] == 3).nonzero().flatten()
    assert int(slots.sum()) == T * K and int(slots[hot_slots].min()) >= T // 4  # 4 replicas share expert 3
    controller.close()


def test_vllm_runtime_built_in_inference_mode_takes_writes_outside_it(tmp_path, monkeypatch):
    """vLLM builds the runtime inside its first forward (inference mode); the worker's step
    wrapper and placement RPCs write the state outside that mode (on the H100 an engine with
    vLLM's compile cache on died at its first step: "Inplace update to inference tensor outside
    InferenceMode")."""
    from omni_passes.hosts.vllm.runtime import VllmRuntime
    from omni_passes.hosts.vllm.settings import process_config
    from omni_passes.placement.placement import Placement

    config = tmp_path / "passes.json"
    config.write_text(json.dumps({"passes": ["redundant_experts"], "report_path": str(tmp_path / "r.json")}))
    monkeypatch.setenv("OMNI_PASSES_CONFIG", str(config))
    with torch.inference_mode():
        runtime = VllmRuntime.create(routed_graph().graph, process_config())
    try:
        controller = runtime.controller
        assert not controller.gate.is_inference() and not controller.replica_slots.is_inference()
        controller.gate.fill_(1)
        swapped = Placement(num_layers=1, num_logical_experts=4, num_ranks=1, num_nodes=1, slots_per_rank=4,
                            phy2log=torch.tensor([[1, 0, 3, 2]]))
        runtime.apply_placement(swapped)  # writes the tables in place
        assert torch.equal(controller.placement.phy2log, swapped.phy2log) and controller.gate.item() == 1
    finally:
        runtime.close()
