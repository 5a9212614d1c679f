"""Online rebalancing (``RebalanceLoop`` deciding, the placement controller applying): move
budget, gain threshold, in-place application with zero recompiles (a torch.compile'd dispatch
over the controller's tensors, and a compiled DeepSeek model)."""

import pytest
import torch
from torch._dynamo.utils import counters

from omni_passes.config import RebalanceConfig
from omni_passes.placement import metrics, traces
from omni_passes.placement.controller import PlacementController
from omni_passes.placement.layout import RowLayout
from omni_passes.placement.placement import Placement
from omni_passes.placement.planner import PlanError, plan
from omni_passes.placement.rebalance import RebalanceLoop, decide


class SlotWeights:
    """Expert weights copied into physical slots (the slot layout); ``apply`` rewrites them in place."""

    def __init__(self, logical: torch.Tensor, layout: RowLayout):
        self.logical = logical  # [L, E, D]
        self.slots = torch.stack([logical[layer, layout.row_expert[layer]] for layer in range(logical.shape[0])])
        self.layout = layout
        self.calls = 0

    def apply(self, layout: RowLayout) -> int:
        changed = int((layout.row_expert != self.layout.row_expert).sum())
        for layer in range(self.slots.shape[0]):
            torch.index_select(self.logical[layer], 0, layout.row_expert[layer], out=self.slots[layer])
        self.layout = layout
        self.calls += 1
        return changed


def slot_controller(placement: Placement, logical: torch.Tensor | None = None) -> PlacementController:
    """Tables over slots; with ``logical`` weights, their copies in the slots (``SlotWeights``)."""
    rows = (lambda layout: SlotWeights(logical, layout)) if logical is not None else None
    return PlacementController(placement, layout="slot", rows=rows)


def drifting(num_layers=6, steps=240):
    return traces.generate(traces.get_spec("deepseek-drift", steps=steps, num_layers=num_layers))


def test_moves_at_most_the_budget_and_apply_in_place():
    trace = drifting()
    start = plan(trace[:40].sum(0), 16, 2, 18)
    controller = slot_controller(start, torch.randn(6, 256, 3))
    weights = controller.weights
    tables = (controller.replica_slots.data_ptr(), controller.replica_count.data_ptr(), weights.slots.data_ptr())
    loop = RebalanceLoop(RebalanceConfig(window_steps=40, interval_steps=40, min_gain=0.0, layer_min_gain=0.0, max_moves=60), 6, 256)
    events = [e for e in (controller.rebalance_step(loop, loads) for loads in trace[40:]) if e is not None]
    assert len(events) == 5 and any(e.applied for e in events)
    for e in events:
        assert e.moves <= 60
    # the tables and the weights hold the same, latest placement, in the same tensors
    assert weights.layout is controller.layout and weights.calls == sum(e.applied for e in events)
    assert torch.equal(weights.layout.row_expert, controller.placement.phy2log)
    assert (controller.replica_slots.data_ptr(), controller.replica_count.data_ptr(), weights.slots.data_ptr()) == tables
    expected = torch.stack([weights.logical[layer, controller.placement.phy2log[layer]] for layer in range(6)])
    assert torch.equal(weights.slots, expected)


def test_each_applied_event_moves_what_it_reports():
    trace = drifting()
    controller = slot_controller(plan(trace[:40].sum(0), 16, 2, 18))
    loop = RebalanceLoop(RebalanceConfig(window_steps=40, interval_steps=40, min_gain=0.0, max_moves=25), 6, 256)
    for loads in trace[40:]:
        before = controller.placement
        event = controller.rebalance_step(loop, loads)
        if event is not None and event.applied:
            assert metrics.slots_changed(before, controller.placement) == event.moves <= 25


def test_rebalancing_helps_on_drifting_loads():
    trace = drifting(steps=600)
    start = plan(trace[:100].sum(0), 16, 2, 18)
    controller = slot_controller(start)
    loop = RebalanceLoop(RebalanceConfig(window_steps=100, interval_steps=100, min_gain=0.0), 6, 256)
    online, static = [], []
    for t in range(100, 600):
        controller.rebalance_step(loop, trace[t])
        if (t + 1) % 100 == 0 and t + 100 < 600:
            nxt = trace[t + 1 : t + 101].sum(0)
            online.append(metrics.score(controller.placement, nxt).mean_balancedness)
            static.append(metrics.score(start, nxt).mean_balancedness)
    assert sum(online) / len(online) > sum(static) / len(static) + 0.02


def test_no_apply_below_the_gain_threshold():
    trace = traces.generate(traces.get_spec("deepseek-translation", steps=80, num_layers=4))
    controller = slot_controller(plan(trace[:40].sum(0), 16, 2, 18))
    before = controller.placement
    loop = RebalanceLoop(RebalanceConfig(window_steps=40, interval_steps=40, min_gain=0.2), 4, 256)
    events = [e for e in (controller.rebalance_step(loop, loads) for loads in trace[40:]) if e is not None]
    assert len(events) == 1 and not events[0].applied
    assert "min_gain" in events[0].reason or "no layer" in events[0].reason
    assert controller.placement is before and controller.updates == 0


def test_step_takes_the_recorded_load_counters():
    controller = slot_controller(Placement.identity(2, 8, num_ranks=2, slots_per_rank=5))
    loop = RebalanceLoop(RebalanceConfig(window_steps=3, interval_steps=100), 2, 8)
    for i in range(5):
        controller.expert_load += torch.arange(8) * (i + 1)  # what omni::record_expert_load does
        controller.rebalance_step(loop)
    assert len(loop.window) == 3  # sliding window
    assert torch.equal(loop.window[-1], (torch.arange(8) * 5).float().expand(2, 8))
    assert int(controller.expert_load.sum()) == 0


def test_bad_arguments():
    placement = Placement.identity(2, 8, num_ranks=2, slots_per_rank=5)
    with pytest.raises(TypeError, match="apply\\(layout\\)"):
        PlacementController(placement, layout="slot", rows=lambda layout: object())
    with pytest.raises(PlanError, match="expected \\(2, 8\\)"):
        RebalanceLoop(RebalanceConfig(), 2, 8).record(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="'rebalance.interval_steps' must be an integer >= 1, got 0"):
        RebalanceConfig(interval_steps=0)
    with pytest.raises(ValueError, match="layout must be one of compact, slot, got 'rows'"):
        PlacementController(placement, layout="rows")
    with pytest.raises(ValueError, match="local_rank needs the slot layout"):
        PlacementController(Placement.identity(2, 8), local_rank=0)


def test_decide_is_a_pure_decision_the_loop_reports():
    """``decide`` touches neither its inputs nor a placement; the loop's event carries its figures."""
    trace = drifting(steps=80)
    current = plan(trace[:40].sum(0), 16, 2, 18)
    before = current.phy2log.clone()
    window = trace[40:80].float()
    config = RebalanceConfig(window_steps=40, interval_steps=40, min_gain=0.0, layer_min_gain=0.0, max_moves=30)
    decision = decide(window, current, config)
    assert torch.equal(current.phy2log, before) and torch.equal(window, trace[40:80].float())
    assert decision.placement is not None and 0 < decision.moves <= 30
    assert metrics.slots_changed(current, decision.placement) == decision.moves
    assert decision.balancedness_candidate > decision.balancedness_before
    kept = decide(window, current, RebalanceConfig(min_gain=1.0))  # no plan gains a whole unit
    assert kept.placement is None and "min_gain 1.0" in kept.reason
    loop = RebalanceLoop(config, 6, 256)
    decisions = [loop.step(loads, current) for loads in trace[40:80]]
    assert decisions[:-1] == [None] * 39 and loop.events[0].step == 40 and loop.events[0].applied
    event = loop.events[0]
    assert (event.moves, event.balancedness_before, event.balancedness_candidate, event.reason) == (
        decision.moves, decision.balancedness_before, decision.balancedness_candidate, decision.reason)
    assert torch.equal(decisions[-1].placement.phy2log, decision.placement.phy2log)


def test_compiled_dispatch_follows_in_place_updates_without_recompiling():
    """A torch.compile'd MoE-style dispatch reads the controller's tables and the slot weights;
    rebalancing changes which slots serve tokens, never the result, and compiles nothing."""
    torch.manual_seed(0)
    layers, experts, dim = 2, 16, 4
    start = Placement.identity(layers, experts, num_ranks=4, slots_per_rank=5)
    controller = slot_controller(start, torch.randn(layers, experts, dim))
    weights = controller.weights

    def dispatch(x, ids):
        outs, slots = [], []
        token = torch.arange(ids.shape[0]).unsqueeze(1)
        for layer in range(layers):
            count = controller.replica_count[layer][ids]
            slot = controller.replica_slots[layer][ids, token % count]
            outs.append((weights.slots[layer][slot] * x.unsqueeze(1)).sum((1, 2)))
            slots.append(slot)
        return torch.stack(outs), torch.stack(slots)

    x = torch.randn(64, dim)
    ids = torch.stack([torch.randperm(experts)[:2] for _ in range(64)])
    ids[:40, 0] = 3  # expert 3 is hot
    reference = torch.stack([(weights.logical[layer][ids] * x.unsqueeze(1)).sum((1, 2)) for layer in range(layers)])
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(dispatch, fullgraph=True)
    out_before, slots_before = compiled(x, ids)
    frames = counters["stats"]["unique_graphs"]
    loop = RebalanceLoop(RebalanceConfig(window_steps=1, interval_steps=1, min_gain=0.0, layer_min_gain=0.0), layers, experts)
    loads = torch.stack([torch.bincount(ids.flatten(), minlength=experts)] * layers)
    event = controller.rebalance_step(loop, loads)
    assert event.applied and event.moves > 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        out_after, slots_after = compiled(x, ids)
    assert counters["stats"]["unique_graphs"] == frames
    torch.testing.assert_close(out_before, reference)
    torch.testing.assert_close(out_after, reference)
    assert not torch.equal(slots_before, slots_after)  # tokens now go to other slots
    # the hot expert's tokens are spread over its replicas after the rebalance
    hot = slots_after[0][:40, 0]
    assert hot.unique().numel() == int(controller.replica_count[0, 3]) > 1


@pytest.mark.slow
def test_rebalancer_on_a_compiled_deepseek_model_zero_recompiles():
    import omni_passes
    from omni_passes.models import build_model, load_hf_config

    model = build_model(load_hf_config("tiny"), seed=0)
    inputs = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(inputs).logits
    start = Placement.identity(3, 16, num_ranks=4, slots_per_rank=5)
    torch._dynamo.reset()
    counters.clear()
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]}, placement=start)
    runtime = compiled.omni
    # the controller owns rows and tables: the loop decides, the controller applies
    loop = RebalanceLoop(RebalanceConfig(window_steps=2, interval_steps=2, min_gain=0.0, layer_min_gain=0.0, max_moves=12), 3, 16)
    outs = []
    with torch.no_grad():
        for _ in range(4):
            outs.append(compiled(inputs).logits)
            graphs = counters["stats"]["unique_graphs"]
            runtime.controller.rebalance_step(loop)
    applied = [e for e in loop.events if e.applied]
    assert applied and all(e.moves <= 12 for e in applied)
    assert runtime.controller.placement is not start
    assert counters["stats"]["unique_graphs"] == graphs == 1
    for out in outs:
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
