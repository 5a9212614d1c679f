"""Placement files: the documented format (docs/interfaces.md), validated with errors that name the problem."""

import json

import pytest
import torch
from torch import nn

from omni_passes.placement.placement import Placement, PlacementError
from omni_passes.placement.tables import dispatch_tables


def write(tmp_path, data):
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(data))
    return path


def good():
    return {"num_layers": 2, "num_logical_experts": 4, "num_ranks": 2, "num_nodes": 1, "slots_per_rank": 3,
            "phy2log": [[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 0, 0]]}


def test_round_trip(tmp_path):
    placement = Placement.load(write(tmp_path, good()))
    assert placement.num_slots == 6 and placement.num_redundant == 2
    assert placement.replica_counts().tolist() == [[2, 2, 1, 1], [3, 1, 1, 1]]
    placement.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == good()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["phy2log"].pop(), "has 1 layer rows but num_layers is 2"),
    (lambda d: d["phy2log"][1].pop(), "phy2log[1] has 5 slots, expected num_ranks * slots_per_rank = 2 * 3 = 6"),
    (lambda d: d["phy2log"][0].__setitem__(3, 0), "MoE layer 0: logical expert 3 has no slot"),
    (lambda d: d["phy2log"][1].__setitem__(2, 9), "phy2log[1][2] = 9 is out of range [0, 4)"),
    (lambda d: d["phy2log"][1].__setitem__(2, -1), "phy2log[1][2] = -1 is out of range"),
    (lambda d: d.update(slots_per_rank=1, phy2log=[[0, 1], [0, 1]]), "2 slots (num_ranks * slots_per_rank) cannot hold 4 experts"),
    (lambda d: d.update(num_nodes=3), "num_ranks (2) is not divisible by num_nodes (3)"),
    (lambda d: d.pop("num_ranks"), "missing key(s) num_ranks"),
    (lambda d: d.update(extra=1), "unknown key(s) extra"),
    (lambda d: d.update(num_layers="2"), "'num_layers' must be a positive integer"),
    (lambda d: d["phy2log"][0].__setitem__(0, 1.5), "non-integer id 1.5"),
])
def test_malformed_files_are_rejected(tmp_path, edit, message):
    data = good()
    edit(data)
    path = write(tmp_path, data)
    with pytest.raises(PlacementError) as info:
        Placement.load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_not_json_and_missing(tmp_path):
    (tmp_path / "bad.json").write_text("[1,")
    with pytest.raises(PlacementError, match="not valid JSON"):
        Placement.load(tmp_path / "bad.json")
    with pytest.raises(PlacementError, match="does not exist"):
        Placement.load(tmp_path / "missing.json")


def test_identity_and_tables():
    placement = Placement.identity(3, 5, num_ranks=2, slots_per_rank=3)
    assert placement.phy2log[0].tolist() == [0, 1, 2, 3, 4, 0]
    slots, counts = dispatch_tables(placement)
    assert counts[0].tolist() == [2, 1, 1, 1, 1]
    assert slots[0, 0, :2].tolist() == [0, 5]
    # every table entry within the count points at a slot holding that expert
    for expert in range(5):
        used = slots[0, expert, : counts[0, expert]]
        assert torch.all(placement.phy2log[0][used] == expert)


def test_compact_layout_keeps_experts_in_their_rows_and_reuses_extra_rows():
    from omni_passes.placement.layout import compact_layout

    E = 4
    first = torch.tensor([[3, 0, 2, 1, 0, 3, 0]])       # extras: 0 (twice), 3
    layout = compact_layout(first, E)
    assert layout.row_expert[0, :E].tolist() == [0, 1, 2, 3]
    # each slot's row holds the slot's expert; slot_row is a permutation of the rows
    assert torch.equal(layout.row_expert.gather(1, layout.slot_row), first)
    assert sorted(layout.slot_row[0].tolist()) == list(range(7))
    # first replica of each expert (in slot order) is its own row
    assert layout.slot_row[0, :4].tolist() == [3, 0, 2, 1]
    second = torch.tensor([[0, 0, 1, 2, 3, 1, 3]])       # extras: 0, 1, 3
    relaid = compact_layout(second, E, previous=layout)
    assert torch.equal(relaid.row_expert.gather(1, relaid.slot_row), second)
    changed = relaid.changed_rows(layout)[0].tolist()
    assert len(changed) == 1 and changed[0] >= E           # only the row that now holds expert 1
    assert relaid.row_expert[0, :E].tolist() == [0, 1, 2, 3]


class Experts(nn.Module):
    """Stacked experts with GPT-OSS-style biases (2-D stacked tensors) beside the 3-D weights."""

    def __init__(self, seed, E):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = nn.Parameter(torch.randn(E, 4, 3, generator=g))
        self.gate_up_proj_bias = nn.Parameter(torch.randn(E, 4, generator=g))
        self.down_proj = nn.Parameter(torch.randn(E, 3, 2, generator=g))
        self.down_proj_bias = nn.Parameter(torch.randn(E, 3, generator=g))
        self.num_experts = E


def test_expert_rows_cover_every_stacked_tensor_move_only_changed_rows_and_keep_no_copy():
    """Storage rows after a chain of placements hold expert row_expert[r] in row r, for the
    weights and the biases; only the R extra rows cost memory; tensors keep their identity."""
    from omni_passes.placement.controller import PlacementController
    from omni_passes.placement.materialize import transformers_expert_rows

    E, S, layers = 6, 9, 2
    model = nn.Sequential(*[Experts(k, E) for k in range(layers)])
    names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    originals = [{n: getattr(m, n).detach().clone() for n in names} for m in model]

    def placement(rows):
        return Placement(num_layers=layers, num_logical_experts=E, num_ranks=1, num_nodes=1, slots_per_rank=S,
                         phy2log=torch.tensor(rows))

    controller = PlacementController(placement([[0, 1, 2, 3, 4, 5, 0, 1, 2]] * layers),
                                     rows=lambda layout: transformers_expert_rows(list(model), E, layout))
    tensors = [getattr(m, n) for m in model for n in names]
    assert all(t.shape[0] == S for t in tensors) and all(m.num_experts == S for m in model)
    chain = [placement([[5, 4, 3, 2, 1, 0, 5, 5, 5], [0, 1, 2, 3, 4, 5, 0, 1, 2]]),  # layer 1 unchanged
             placement([[3, 3, 3, 0, 1, 2, 4, 5, 0], [2, 0, 1, 5, 4, 3, 3, 2, 1]]),
             placement([[0, 1, 2, 3, 4, 5, 1, 1, 1]] * layers)]
    copies = []
    for p in chain:
        copies.append(controller.apply(p))
        layout = controller.layout
        for layer, module in enumerate(model):
            for name in names:
                assert torch.equal(getattr(module, name), originals[layer][name][layout.row_expert[layer]])
            # every slot's row holds the slot's expert, so the tables name the right weights
            assert torch.equal(layout.row_expert[layer][layout.slot_row[layer]], p.phy2log[layer])
    assert copies[0] == 3 and copies[-1] > 0
    assert [getattr(m, n) for m in model for n in names] == tensors
    held = {id(t) for layer in controller.weights.storage for t in layer.values()}
    assert held == {id(t) for t in tensors}
    assert controller.weights.extra_bytes() == (S - E) * sum(originals[0][n][0].numel() * 4 for n in names) * layers
