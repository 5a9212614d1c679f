"""The dispatch pass on transformers DeepSeek graphs: exactness, no graph breaks, in-place
placement updates with zero recompiles, load counts, and graphs it must leave alone."""

import pytest
import torch
from torch._dynamo.utils import counters

import omni_passes
from omni_passes.models import build_model, load_hf_config
from omni_passes.placement.placement import Placement

# fp32 on CPU: compiled graphs fuse and reorder float ops, so compiled vs eager differ by
# rounding (~1e-7 relative); routing decisions are identical, so anything beyond this is a bug.
ATOL = 1e-5


def tiny(n_group: int, seed: int = 0):
    overrides = {"n_group": n_group, "topk_group": 2 if n_group > 1 else 1}
    return build_model(load_hf_config("tiny", overrides=overrides), seed=seed)


def hot_replica_placement(model, inputs, copies_per_hot=3, hot=4):
    """Replicate each layer's `hot` most loaded experts (measured by an eager run)."""
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]})
    with torch.no_grad():
        compiled(inputs)
    loads = compiled.omni.placement_state.take_load()
    torch._dynamo.reset()
    layers, experts = loads.shape
    rows = []
    for layer in range(layers):
        hottest = loads[layer].argsort(descending=True)[:hot]
        extra = hottest.repeat_interleave(copies_per_hot - 1)
        rows.append(torch.cat([torch.arange(experts), extra]))
    phy2log = torch.stack(rows)
    return Placement(num_layers=layers, num_logical_experts=experts, num_ranks=1, num_nodes=1,
                     slots_per_rank=phy2log.shape[1], phy2log=phy2log)


@pytest.fixture(scope="module")
def inputs():
    return torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("n_group", [4, 1])
@pytest.mark.parametrize("replicated", [False, True], ids=["identity", "hot-replicas"])
def test_compiled_with_pass_equals_original(n_group, replicated, inputs):
    model = tiny(n_group)
    with torch.no_grad():
        reference = model(inputs).logits
    placement = hot_replica_placement(model, inputs) if replicated else None
    torch._dynamo.reset()
    counters.clear()
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]}, placement=placement)
    with torch.no_grad():
        out = compiled(inputs).logits
    report = compiled.omni.report()["passes"]["redundant_experts"]
    assert report["matched_layers"] == [1, 2, 3]
    assert report["skipped"] == []
    assert counters["stats"]["unique_graphs"] == 1          # fullgraph: one graph, no breaks
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
    if replicated:
        assert compiled.omni.placement_state.placement.num_redundant == 4 * 2  # slots beyond E per layer
        # load counts: every MoE layer routed tokens x top_k choices
        load = compiled.omni.placement_state.expert_load
        assert load.sum(dim=1).tolist() == [inputs.numel() * 4] * 3


def test_load_counts_equal_bincount_of_router_choices(inputs):
    model = tiny(4)
    chosen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: chosen.append(out[2].clone()))
             for layer in model.model.layers[1:]]
    with torch.no_grad():
        model(inputs)
    for hook in hooks:
        hook.remove()
    torch._dynamo.reset()
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]})
    with torch.no_grad():
        compiled(inputs)
    expected = torch.stack([torch.bincount(ids.flatten(), minlength=16) for ids in chosen])
    assert torch.equal(compiled.omni.placement_state.expert_load, expected)


def test_placement_update_in_place_changes_routing_without_recompile(inputs):
    model = tiny(4)
    with torch.no_grad():
        reference = model(inputs).logits
    experts = 16

    def doubled(order):
        phy = torch.cat([torch.arange(experts), order]).repeat(3, 1)
        return Placement(num_layers=3, num_logical_experts=experts, num_ranks=1, num_nodes=1, slots_per_rank=32, phy2log=phy)

    place_a = doubled(torch.arange(experts))
    place_b = doubled(torch.arange(experts).flip(0))
    torch._dynamo.reset()
    counters.clear()
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]}, placement=place_a)
    with torch.no_grad():
        out_a = compiled(inputs).logits
        graphs = counters["stats"]["unique_graphs"]
        compiled.omni.apply_placement(place_b)            # tables + slot weights, in place
        out_b = compiled(inputs).logits
        # Tables back to A while the slot weights stay B's: slots 16..31 now hold other
        # experts than the tables say, so the output must change if routing reads the tables.
        compiled.omni.placement_state.apply(place_a)
        out_mismatched = compiled(inputs).logits
    assert counters["stats"]["unique_graphs"] == graphs   # zero recompiles
    torch.testing.assert_close(out_a, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_b, reference, atol=ATOL, rtol=0)
    assert (out_mismatched - reference).abs().max() > 1e-3


def test_graph_without_moe_is_untouched_and_report_says_why(inputs):
    config = load_hf_config("tiny", overrides={"first_k_dense_replace": 4})  # every layer dense
    model = build_model(config)
    with torch.no_grad():
        reference = model(inputs).logits
    torch._dynamo.reset()
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]})
    with torch.no_grad():
        out = compiled(inputs).logits
    report = compiled.omni.report()["passes"]["redundant_experts"]
    assert report["matched_layers"] == []
    assert report["rewritten_nodes"] == 0
    assert "no MoE routing found" in report["skipped"][0]["reason"]
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)


def test_pass_on_plain_graph_leaves_it_identical():
    from omni_passes.fx.redundant_experts import RedundantExpertDispatchPass
    from omni_passes.placement.runtime import ExpertPlacementState

    def f(x, w):
        values, ids = torch.topk(x @ w, 2)
        return values.sum() + ids.sum()

    gm = torch.fx.symbolic_trace(f)
    before = str(gm.graph)
    report = RedundantExpertDispatchPass(ExpertPlacementState(Placement.identity(1, 4)))(gm.graph)
    assert str(gm.graph) == before
    assert report.matched_layers == []
    assert report.skipped and "no MoE routing found" in report.skipped[0].reason


def test_placement_for_another_model_is_rejected():
    model = tiny(4)
    wrong = Placement.identity(5, 16)
    with pytest.raises(ValueError, match="5 MoE layers x 16 experts, but the model has 3 MoE layers"):
        omni_passes.compile(model, {"passes": ["redundant_experts"]}, placement=wrong)
