"""omni_passes.fx.moe_forward_slots on vLLM 0.26 CUDA's MoE graph piece (a saved fixture).

The fixture is the post-grad piece holding one DeepSeek MoE layer as vLLM's CUDA build gives it
to a custom pass; CPU machines lack ``vllm::moe_forward_shared``, so the loader defines a
stand-in from the saved schema, and the omni ops are defined here with the fixture's
layer-name type under a test namespace.
"""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch
from torch import fx

from kernels.vllm_slot_moe import define_slot_ops, slot_schemas
from omni_passes.fx.moe_forward_slots import (
    MoeForwardSlots,
    SlotMoeOps,
    layer_from_name,
    vllm_sources,
)
from omni_passes.testing.graph_fixture import (
    FixtureOpaque,
    _opaque_type_name,
    count_targets,
    define_standin,
    graph_to_json,
    load_graph,
    resolve_target,
    target_name,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "vllm026_cuda_moe_piece.json"
SHARED = "vllm::moe_forward_shared.default"
PLAIN_SCHEMA = ("vllm::moe_forward(Tensor(a0!) hidden_states, Tensor router_logits, Tensor? shared_experts_input, "
                "Tensor? input_ids, PyObject layer_name, SymInt hidden_dim_unpadded) -> Tensor")
OMNI = "omni_test_slots::vllm_slot_moe_forward_shared.default"


@pytest.fixture(scope="module")
def ops():
    return define_slot_ops(layer_name_type=_opaque_type_name(), namespace="omni_test_slots")


def sources(graph: fx.Graph | None = None) -> dict:
    import json

    schemas = json.loads(FIXTURE.read_text())["schemas"]
    return {"shared": resolve_target(SHARED, schemas), "plain": define_standin("vllm::moe_forward.default", PLAIN_SCHEMA)}


def moe_node(graph: fx.Graph, name: str) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "call_function" and target_name(n.target) == name)


def test_fixture_holds_the_opaque_moe_node_as_vllm_emits_it():
    graph = load_graph(FIXTURE)
    node = moe_node(graph, SHARED)
    hidden = node.args[0]
    assert node.args[1] is hidden and node.args[2] is hidden  # router logits = hidden: the gate runs inside
    assert node.args[3] is None and node.args[5] == 0
    layer_name = node.args[4]
    assert layer_name.op == "placeholder" and isinstance(layer_name.meta["val"], FixtureOpaque)
    shared, routed = node.meta["val"]
    assert tuple(shared.shape) == tuple(routed.shape) == tuple(hidden.meta["val"].shape)
    scale = next(iter(u for u in node.users if u.args[1] == 1)).users
    assert [target_name(u.target) for u in scale] == ["aten::mul.Tensor"] and next(iter(scale)).args[1] == 2.5


def test_rewrite_retargets_the_node_and_leaves_everything_else(ops):
    graph = load_graph(FIXTURE)
    before = count_targets(graph)
    old = moe_node(graph, SHARED)
    args, users = old.args, {u.name for u in old.users}
    report = MoeForwardSlots(SlotMoeOps(ops.shared, ops.plain, state=1 << 41), sources(graph))(graph)

    assert report.as_dict()["matched_layers"] == [1] and report.rewritten_nodes == 1 and not report.skipped
    new = moe_node(graph, OMNI)
    assert new.args == args and new.kwargs == {"state": 1 << 41}
    assert {u.name for u in new.users} == users and all(u.target is operator.getitem for u in new.users)
    assert [tuple(v.shape) for v in new.meta["val"]] == [tuple(v.shape) for v in old.meta["val"]]
    after = count_targets(graph)
    assert after.pop(OMNI) == 1 and before.pop(SHARED) == 1
    assert after == before  # every other op untouched
    # the rewritten graph is a valid fixture again (the omni op is a registered op here)
    assert graph_to_json(graph)["schemas"][OMNI].startswith("omni_test_slots::vllm_slot_moe_forward_shared(")


def test_omni_schemas_extend_vllms_by_the_state_handle(ops):
    standin = sources()["shared"]
    assert [a.name for a in ops.shared._schema.arguments] == [a.name for a in standin._schema.arguments] + ["state"]
    assert [a.name for a in ops.plain._schema.arguments] == [a.name for a in sources()["plain"]._schema.arguments] + ["state"]
    assert "Tensor(a0!) hidden_states" in slot_schemas("str")["plain"]


def test_no_moe_node_leaves_the_graph_untouched(ops):
    graph = load_graph(FIXTURE)
    MoeForwardSlots(SlotMoeOps(ops.shared, ops.plain), sources())(graph)
    text = str(graph)
    report = MoeForwardSlots(SlotMoeOps(ops.shared, ops.plain), sources())(graph)  # nothing left to match
    assert str(graph) == text and report.rewritten_nodes == 0 and not report.skipped
    # (the fixture's stand-ins carry the prefix of their test library)
    assert report.notes == [("no vLLM MoE op (omni_fixture_vllm::moe_forward_shared, omni_fixture_vllm::moe_forward) "
                             "in this graph piece")]


def test_vllm_absent_from_the_process_leaves_the_graph_untouched(ops):
    graph = load_graph(FIXTURE)
    text = str(graph)
    report = MoeForwardSlots(SlotMoeOps(ops.shared), {"shared": None, "plain": None})(graph)
    assert str(graph) == text and report.notes == ["no vLLM MoE op (none registered in this process) in this graph piece"]


def test_default_sources_are_looked_up_by_name_without_importing_vllm():
    found = vllm_sources()
    for op in found.values():
        assert op is None or op._schema.name.startswith("vllm::moe_forward")


def _graph_with(source, standin_args: dict, layer: str | None = "model.layers.7.mlp.experts", wrapped: bool = False):
    graph = fx.Graph()
    hidden = graph.placeholder("hidden")
    name = graph.placeholder("layer_name")
    if layer is not None:
        name.meta["val"] = FixtureOpaque(layer, "vllm.utils.torch_utils.LayerName")
    args = {"hidden_states": hidden, "router_logits": hidden, "shared_experts_input": None, "input_ids": None,
            "layer_name": name, "hidden_dim_unpadded": 0, **standin_args}
    if wrapped:
        kwargs = {k: v for k, v in args.items() if k != "hidden_states"}
        node = graph.call_function(torch.ops.higher_order.auto_functionalized_v2, (source,),
                                   {**kwargs, "_hidden_states_base_index": 0, "_all_bases": [hidden]})
        out = graph.call_function(operator.getitem, (node, 0))
    else:
        node = graph.call_function(source, tuple(args.values()))
        out = graph.call_function(operator.getitem, (node, 1))
    graph.output((out,))
    return graph, node


def test_functionalized_moe_forward_gets_the_plain_omni_op(ops):
    plain = sources()["plain"]
    graph, node = _graph_with(plain, {}, wrapped=True)
    kwargs = dict(node.kwargs)
    report = MoeForwardSlots(SlotMoeOps(ops.shared, ops.plain, state=5), sources())(graph)
    assert report.matched_layers == [7] and report.rewritten_nodes == 1
    new = next(n for n in graph.nodes if n.target is torch.ops.higher_order.auto_functionalized_v2)
    assert new.args == (ops.plain,) and new.kwargs == {**kwargs, "state": 5}


@pytest.mark.parametrize("change,reason", [
    ({"input_ids": "ids"}, "input_ids given"),
    ({"hidden_dim_unpadded": 2816}, "hidden_dim_unpadded=2816"),
])
def test_unsupported_calls_are_skipped_with_their_reason(ops, change, reason):
    graph, node = _graph_with(sources()["shared"], {})
    if change.get("input_ids"):
        with graph.inserting_before(node):
            ids = graph.placeholder("input_ids")
        node.update_arg(3, ids)
    else:
        node.update_arg(5, change["hidden_dim_unpadded"])
    text = str(graph)
    report = MoeForwardSlots(SlotMoeOps(ops.shared, ops.plain), sources())(graph)
    assert str(graph) == text and report.rewritten_nodes == 0
    (skip,) = report.as_dict()["skipped"]
    assert skip["layer"] == 7 and skip["reason"].startswith("omni_fixture_vllm::moe_forward_shared: ") and reason in skip["reason"]


def test_missing_or_mismatched_replacements_are_skipped(ops):
    graph, _ = _graph_with(sources()["plain"], {}, wrapped=True)
    report = MoeForwardSlots(SlotMoeOps(ops.shared, plain=None), sources())(graph)
    assert report.as_dict()["skipped"] == [{"layer": 7, "reason": "omni_fixture_vllm::moe_forward: the host gave no omni op for it"}]
    graph, _ = _graph_with(sources()["shared"], {})
    report = MoeForwardSlots(SlotMoeOps(torch.ops.aten.mm.default), sources())(graph)
    assert "takes (self, mat2), not vLLM's arguments plus state" in report.skipped[0].reason


def test_unknown_layer_is_rewritten_and_noted(ops):
    graph, node = _graph_with(sources()["shared"], {}, layer=None)
    report = MoeForwardSlots(SlotMoeOps(ops.shared), sources())(graph)
    assert report.rewritten_nodes == 1 and report.matched_layers == []
    assert f"{node.name}: layer name not known at compile time" in report.notes


def test_layer_from_name_reads_every_form_vllm_uses():
    class LayerName:  # vLLM's opaque wrapper
        def __init__(self, value):
            self.value = value

    class Fake:  # what tracing holds for it
        def __init__(self, real):
            self.real_obj = real

    assert layer_from_name("model.layers.12.mlp.experts") == 12
    assert layer_from_name(LayerName("model.layers.3.mlp.experts")) == 3
    assert layer_from_name(Fake(LayerName("language_model.model.layers.40.mlp.experts"))) == 40
    assert layer_from_name("from_forward_context") is None and layer_from_name(None) is None
