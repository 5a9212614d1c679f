"""Placement JSON files: malformed ones are rejected with a message naming the problem."""

import json

import pytest
import torch

from omni_passes.placement.placement import Placement, PlacementError


def valid() -> dict:
    # 2 MoE layers, 4 experts, 2 ranks x 3 slots
    return {"num_layers": 2, "num_logical_experts": 4, "num_ranks": 2, "num_nodes": 1, "slots_per_rank": 3,
            "phy2log": [[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 0, 0]]}


def write(tmp_path, data) -> str:
    path = tmp_path / "placement.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_round_trip(tmp_path):
    p = Placement.load(write(tmp_path, valid()))
    assert p.phy2log.tolist() == valid()["phy2log"]
    assert p.replica_counts().tolist() == [[2, 2, 1, 1], [3, 1, 1, 1]]
    p.save(tmp_path / "again.json")
    assert torch.equal(Placement.load(tmp_path / "again.json").phy2log, p.phy2log)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d["phy2log"][1].pop(), r"phy2log\[1\] has 5 slots, expected num_ranks \* slots_per_rank = 2 \* 3 = 6"),
        (lambda d: d["phy2log"].pop(), "'phy2log' has 1 layer rows but num_layers is 2"),
        (lambda d: d.update(num_ranks=3), r"phy2log\[0\] has 6 slots, expected .* = 9"),
        (lambda d: d["phy2log"][0].__setitem__(3, 2), "MoE layer 0: logical expert 3 has no slot"),
        (lambda d: d["phy2log"][1].__setitem__(5, 4), r"phy2log\[1\]\[5\] = 4 is out of range \[0, 4\)"),
        (lambda d: d["phy2log"][0].__setitem__(0, -1), r"phy2log\[0\]\[0\] = -1 is out of range"),
        (lambda d: d["phy2log"][0].__setitem__(2, 1.5), r"phy2log\[0\] holds non-integer id 1.5"),
        (lambda d: d["phy2log"][0].__setitem__(2, True), r"phy2log\[0\] holds non-integer id True"),
        (lambda d: d.update(phy2log=[0, 1]), "'phy2log' must be a list of lists"),
        (lambda d: d.pop("slots_per_rank"), "missing key\\(s\\) slots_per_rank"),
        (lambda d: d.update(extra=1), "unknown key\\(s\\) extra"),
        (lambda d: d.update(num_nodes=0), "'num_nodes' must be a positive integer, got 0"),
        (lambda d: d.update(num_layers="2"), "'num_layers' must be a positive integer, got '2'"),
        (lambda d: d.update(num_nodes=4, num_ranks=2), r"num_ranks \(2\) is not divisible by num_nodes \(4\)"),
        (lambda d: d.update(num_logical_experts=8), "6 slots .* cannot hold 8 experts"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, mutate, message):
    data = valid()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(PlacementError, match=message) as info:
        Placement.load(path)
    assert path in str(info.value)  # and the file


def test_unreadable_files(tmp_path):
    with pytest.raises(PlacementError, match="does not exist"):
        Placement.load(tmp_path / "missing.json")
    with pytest.raises(PlacementError, match="is not valid JSON"):
        Placement.load(write(tmp_path, "{not json"))
    with pytest.raises(PlacementError, match="expected a JSON object, got list"):
        Placement.load(write(tmp_path, [1, 2]))


def test_tensor_built_placements_are_validated_too():
    with pytest.raises(PlacementError, match=r"phy2log has shape \(2, 5\), expected \(2, 6\)"):
        Placement(2, 4, 2, 1, 3, torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(PlacementError, match="must be an int64 tensor"):
        Placement(1, 4, 2, 1, 2, torch.tensor([[0, 1, 2, 3]], dtype=torch.int32))
