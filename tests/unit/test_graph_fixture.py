"""omni_passes.testing.graph_fixture: FX graphs saved as JSON and rebuilt on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from omni_passes.testing.graph_fixture import (
    FixtureError,
    count_targets,
    dump_graph,
    graph_from_json,
    graph_from_readable,
    graph_to_json,
    load_graph,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "vllm026_cuda_moe_piece.json"


def test_the_vllm_fixture_round_trips_exactly():
    document = json.loads(FIXTURE.read_text())
    again = graph_to_json(load_graph(FIXTURE), document["source"])
    assert document["torch"] == "2.11.0+cu130" and again["torch"] == torch.__version__  # who wrote it
    assert {k: v for k, v in again.items() if k != "torch"} == {k: v for k, v in document.items()
                                                                 if k in again and k != "torch"}
    assert document["schemas"]["vllm::moe_forward_shared.default"] == (
        "vllm::moe_forward_shared(Tensor hidden_states, Tensor router_logits, Tensor? shared_experts_input, "
        "Tensor? input_ids, PyObject layer_name, SymInt hidden_dim_unpadded) -> (Tensor, Tensor)")


def test_a_symbolic_trace_round_trips_with_its_sizes_and_runs_again(tmp_path):
    def f(x, w):
        y = torch.nn.functional.silu(x @ w).sum(-1, keepdim=True)
        return torch.cat([x, y.expand(-1, 2)], dim=1).view(-1)

    gm = make_fx(f, tracing_mode="symbolic")(torch.randn(5, 4), torch.randn(4, 3))
    path = dump_graph(gm, tmp_path / "g.json", source="make_fx")
    graph = load_graph(path)
    assert graph_to_json(graph, "make_fx") == json.loads(path.read_text())
    x = next(n for n in graph.nodes if n.op == "placeholder").meta["val"]
    assert isinstance(x.shape[0], torch.SymInt) and x.device == torch.device("cpu")
    view = next(n for n in graph.nodes if n.target is torch.ops.aten.view.default)
    assert str(view.meta["val"].shape[0]) == str(next(n for n in gm.graph.nodes if n.target is torch.ops.aten.view.default).meta["val"].shape[0])
    rebuilt = torch.fx.GraphModule(torch.nn.Module(), graph)
    a, b = torch.randn(7, 4), torch.randn(4, 3)
    torch.testing.assert_close(rebuilt(a, b), f(a, b))


READABLE = '''
class GraphModule(torch.nn.Module):
    def forward(self, arg0_1: "bf16[s9, 16]", arg1_1: "Sym(s9)", arg2_1):
        # File: somewhere.py:1 in forward
        mm: "bf16[s9, 16]" = torch.ops.aten.mm.default(arg0_1, arg0_1);  arg0_1 = None
        pair = torch.ops.omni_readable_test.pair.default(mm, arg2_1);  mm = None
        getitem: "f32[s9, 2*s9]" = pair[0]
        getitem_1: "bf16[s9, 16]" = pair[1];  pair = None
        mul: "Sym(16*s9)" = arg1_1 * 16;  arg1_1 = None
        view: "bf16[16*s9]" = torch.ops.aten.reshape.default(getitem_1, [mul]);  getitem_1 = mul = None
        return (getitem, view)
'''


def test_readable_dumps_become_graphs_with_printed_names_and_shapes():
    schema = "omni_readable_test::pair(Tensor x, str tag) -> (Tensor, Tensor)"
    graph = graph_from_readable(READABLE, {"omni_readable_test::pair.default": schema}, device="cpu")
    names = [n.name for n in graph.nodes]
    assert names == ["arg0_1", "arg1_1", "arg2_1", "mm", "pair", "getitem", "getitem_1", "mul", "view", "output"]
    shapes = {n.name: n.meta["val"] for n in graph.nodes if "val" in n.meta}
    assert str(shapes["getitem"].shape) == "torch.Size([s9, 2*s9])" and shapes["getitem"].dtype == torch.float32
    assert [str(s) for s in shapes["pair"][1].shape] == ["s9", "16"] and tuple(shapes["mm"].stride()) == (16, 1)
    assert str(shapes["mul"]) == "16*s9" and str(shapes["view"].shape[0]) == "16*s9"
    assert count_targets(graph)["omni_readable_test::pair.default"] == 1
    document = graph_to_json(graph)
    assert document["schemas"] == {"omni_readable_test::pair.default": schema}
    assert graph_to_json(graph_from_json(document)) == document


def test_bad_fixtures_name_the_problem(tmp_path):
    with pytest.raises(FixtureError, match="format 'other', expected 'omni-fx-graph/1'"):
        graph_from_json({"format": "other", "nodes": []}, "x.json")
    document = json.loads(FIXTURE.read_text())
    document["nodes"][20]["target"] = "nowhere_ns::op.default"
    with pytest.raises(FixtureError, match="op nowhere_ns::op.default is not registered here and the fixture has no schema"):
        graph_from_json(document, "x.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(FixtureError, match="broken.json: cannot read the fixture"):
        load_graph(broken)
