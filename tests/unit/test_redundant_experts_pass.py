"""The dispatch pass in the compile path (transformers DeepSeek-V3 with n_group 4 and 1, and
V2; fp32 on CPU): every placement exact against eager, chains of in-place re-placements with
zero recompiles, per-slot loads, a model compiled as two graph pieces, graphs it must leave
alone, and placements it must refuse."""

import json

import pytest
import torch
from torch._dynamo.utils import counters

import omni_passes
from omni_passes.models import build_model, load_hf_config
from omni_passes.placement.placement import Placement, PlacementError
from omni_passes.testing.placements import (MODEL_KINDS, permuted, placement, redundant_permuted, reversed_placement,
                                            tiny_config)

# fp32 on CPU: compiled graphs fuse and reorder float ops, so compiled vs eager differ by
# rounding (~1e-7); routing decisions are identical, so anything beyond this is a bug (a
# wrong expert in one slot moves logits by ~0.1).
ATOL = 1e-5
E, MOE_LAYERS, TOP_K = 16, 3, 4


@pytest.fixture(scope="module")
def inputs():
    return torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(7))


def reference_and_model(kind, inputs):
    model = build_model(tiny_config(kind), seed=0)
    with torch.no_grad():
        reference = model(inputs).logits
    return reference, model


def run(compiled, inputs):
    with torch.no_grad():
        return compiled(inputs).logits


def step_loads(controller, compiled, inputs):
    """Run one step; its per-expert and per-slot loads, and the slot loads summed per expert
    through the current placement (a slot's cumulative count follows the slot across
    re-placements, so this holds per step)."""
    experts_before, slots_before = controller.total_expert_load(), controller.total_slot_load()
    out = run(compiled, inputs)
    experts = controller.total_expert_load() - experts_before
    slots = controller.total_slot_load() - slots_before
    per_expert = torch.zeros_like(experts).scatter_add_(1, controller.placement.phy2log, slots)
    return out, experts, slots, per_expert


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_permutations_exact_and_applied_in_place(kind, inputs):
    """Reversed, random and identity permutations (no redundant slots), one compile."""
    reference, model = reference_and_model(kind, inputs)
    generator = torch.Generator().manual_seed(11)
    torch._dynamo.reset()
    counters.clear()
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]}, placement=reversed_placement(MOE_LAYERS, E))
    controller = compiled.omni.controller
    chain = [reversed_placement(MOE_LAYERS, E), permuted(MOE_LAYERS, E, generator), permuted(MOE_LAYERS, E, generator),
             Placement.identity(MOE_LAYERS, E)]
    for step, p in enumerate(chain):
        if step:
            assert compiled.omni.apply_placement(p) == 0  # a permutation moves no weights
        out, experts, slots, per_expert = step_loads(controller, compiled, inputs)
        torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
        assert torch.equal(per_expert, experts)  # slot loads add up to the logical loads
        assert torch.equal(slots, experts.gather(1, controller.placement.phy2log))  # one slot per expert
        assert controller.take_load().sum(1).tolist() == [inputs.numel() * TOP_K] * MOE_LAYERS
    report = compiled.omni.report()["passes"]["redundant_experts"]
    assert report["matched_layers"] == [1, 2, 3] and report["skipped"] == []
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["graph_break"].values()) == 0


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_redundant_and_permuted_chain_exact_with_replicas_used(kind, inputs):
    """R = 6 extra slots per layer, shuffled; then a chain of in-place re-placements that
    replicate other experts (rows rewritten), each exact, zero recompiles."""
    reference, model = reference_and_model(kind, inputs)
    generator = torch.Generator().manual_seed(5)
    start = redundant_permuted(MOE_LAYERS, E, 6, generator, ranks=2)
    torch._dynamo.reset()
    counters.clear()
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]}, placement=start)
    controller = compiled.omni.controller
    storage = [t for layer in controller.weights.storage for t in layer.values()]
    assert all(t.shape[0] == E + 6 for t in storage)
    torch.testing.assert_close(run(compiled, inputs), reference, atol=ATOL, rtol=0)
    copied = 0
    for _ in range(3):
        copied += compiled.omni.apply_placement(redundant_permuted(MOE_LAYERS, E, 6, generator, ranks=2))
        torch.testing.assert_close(run(compiled, inputs), reference, atol=ATOL, rtol=0)
    assert copied > 0
    assert [t.data_ptr() for layer in controller.weights.storage for t in layer.values()] == [t.data_ptr() for t in storage]
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(controller.total_slot_load().sum(1), controller.total_expert_load().sum(1))
    assert controller.total_expert_load().sum(1).tolist() == [4 * inputs.numel() * TOP_K] * MOE_LAYERS
    # this placement's replicas: slot loads add up per expert, and every slot of an expert
    # with at least as many tokens as replicas got some (the j-th token takes replica j mod c)
    out, step_experts, step_slots, per_expert = step_loads(controller, compiled, inputs)
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
    assert torch.equal(per_expert, step_experts)
    counts = controller.placement.replica_counts()
    phy2log = controller.placement.phy2log
    for layer in range(MOE_LAYERS):
        for slot in range(phy2log.shape[1]):
            expert = phy2log[layer, slot]
            if counts[layer, expert] > 1 and step_experts[layer, expert] >= counts[layer, expert]:
                assert step_slots[layer, slot] > 0
    assert (counts > 1).any()


def piecewise_backend(manager, split_layer: int):
    """A torch.compile backend that compiles the model as two graph pieces, split where
    decoder layer ``split_layer`` starts (as vLLM's piecewise backend splits one traced graph),
    each piece through Inductor with the omni passes, compiled on its first call."""
    from torch.fx.passes.split_module import split_module

    from omni_passes.hosts.torch_compile import inductor_backend
    from omni_passes.fx.utils import layer_index

    inner = inductor_backend(manager)

    class Lazy(torch.nn.Module):
        def __init__(self, sub):
            super().__init__()
            self.sub, self.fn = sub, None

        def forward(self, *args):
            if self.fn is None:
                self.fn = inner(self.sub, list(args))
            return self.fn(*args)

    def backend(gm, example_inputs):
        piece, parts = 0, {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and (layer_index(node) or 0) >= split_layer:
                piece = 1
            parts[node] = piece
        split = split_module(gm, None, lambda node: parts[node])
        for name, sub in list(split.named_children()):
            setattr(split, name, Lazy(sub))
        return split

    return backend


def test_two_graph_pieces_are_both_rewritten(inputs):
    """One traced model compiled as two graphs (split before decoder layer 2): one runtime,
    every MoE layer rewritten and counted, exact with redundant slots."""
    from omni_passes.registry import prepare
    from omni_passes.config import PassConfig

    reference, model = reference_and_model("v3-ngroup4", inputs)
    start = redundant_permuted(MOE_LAYERS, E, 4, torch.Generator().manual_seed(2))
    runtime = prepare(model, PassConfig.from_dict({"passes": ["redundant_experts"]}), start)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=piecewise_backend(runtime.manager, split_layer=2), fullgraph=True)
    torch.testing.assert_close(run(compiled, inputs), reference, atol=ATOL, rtol=0)
    assert runtime.manager.graphs_seen == 2
    assert runtime.report()["passes"]["redundant_experts"]["matched_layers"] == [1, 2, 3]
    loads = runtime.controller.total_expert_load()
    assert loads.sum(1).tolist() == [inputs.numel() * TOP_K] * MOE_LAYERS


def test_load_counts_equal_bincount_of_router_choices(inputs):
    model = build_model(load_hf_config("tiny"), seed=0)
    chosen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: chosen.append(out[2].clone()))
             for layer in model.model.layers[1:]]
    with torch.no_grad():
        model(inputs)
    for hook in hooks:
        hook.remove()
    torch._dynamo.reset()
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]})
    run(compiled, inputs)
    expected = torch.stack([torch.bincount(ids.flatten(), minlength=E) for ids in chosen])
    assert torch.equal(compiled.omni.controller.expert_load, expected)
    compiled.omni.controller.gate.zero_()  # what a host does for warm-up batches
    run(compiled, inputs)
    assert torch.equal(compiled.omni.controller.expert_load, expected)


def test_graph_without_moe_is_untouched_and_report_says_why(inputs):
    config = load_hf_config("tiny", overrides={"first_k_dense_replace": 4})  # every layer dense
    model = build_model(config)
    with torch.no_grad():
        reference = model(inputs).logits
    torch._dynamo.reset()
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]})
    out = run(compiled, inputs)
    report = compiled.omni.report()["passes"]["redundant_experts"]
    assert report["matched_layers"] == []
    assert report["rewritten_nodes"] == 0
    assert "no MoE routing found" in report["skipped"][0]["reason"]
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)


def test_pass_on_plain_graph_leaves_it_identical():
    from omni_passes.fx.redundant_experts import RedundantExpertDispatchPass
    from omni_passes.placement.controller import PlacementController

    def f(x, w):
        values, ids = torch.topk(x @ w, 2)
        return values.sum() + ids.sum()

    gm = torch.fx.symbolic_trace(f)
    before = str(gm.graph)
    report = RedundantExpertDispatchPass(PlacementController(Placement.identity(1, 4)))(gm.graph)
    assert str(gm.graph) == before
    assert report.matched_layers == []
    assert report.skipped and "no MoE routing found" in report.skipped[0].reason


def test_placement_for_another_model_is_rejected_naming_the_file(tmp_path):
    model = build_model(load_hf_config("tiny"), seed=0)
    wrong = tmp_path / "placement.json"
    Placement.identity(5, 16).save(wrong)
    config = tmp_path / "passes.json"
    config.write_text(json.dumps({"passes": ["redundant_experts"], "placement": "placement.json"}))
    with pytest.raises(PlacementError) as info:
        omni_passes.compile(model, str(config))
    assert f"placement file {wrong} is for 5 MoE layers x 16 experts, but the model has 3 MoE layers" in str(info.value)


def test_redundant_slots_refused_where_expert_tensors_cannot_be_extended():
    from omni_passes.placement.controller import PlacementController

    extra = placement([list(range(16)) + [0, 1]] * 3, 16)
    with pytest.raises(PlacementError, match="2 redundant slots per MoE layer refused: no weights here"):
        PlacementController(extra, rows=None, cannot_extend="no weights here")
    PlacementController(permuted(3, 16, torch.Generator().manual_seed(0)), rows=None)  # R = 0 needs no rows
