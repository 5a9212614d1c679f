"""The balance metric against hand-computed cases."""

import pytest
import torch

from omni_passes.placement import metrics
from omni_passes.placement.placement import Placement


def test_replicas_split_load_evenly_and_ranks_sum_their_slots():
    # 2 ranks x 3 slots; expert 0 (load 8) has three replicas -> 8/3 each.
    phy2log = torch.tensor([[0, 1, 2, 3, 0, 0]])
    loads = torch.tensor([[8.0, 4.0, 2.0, 2.0]])
    slots = metrics.slot_loads(phy2log, loads)
    torch.testing.assert_close(slots, torch.tensor([[8 / 3, 4.0, 2.0, 2.0, 8 / 3, 8 / 3]], dtype=torch.float64))
    ranks = metrics.rank_loads(phy2log, loads, slots_per_rank=3)
    torch.testing.assert_close(ranks, torch.tensor([[8 / 3 + 6.0, 2.0 + 16 / 3]], dtype=torch.float64))
    report = metrics.score(phy2log, loads, slots_per_rank=3)
    # mean 8, max 26/3
    assert report.imbalance[0] == pytest.approx((26 / 3) / 8)
    assert report.balancedness[0] == pytest.approx(8 / (26 / 3))


def test_perfect_split_is_one_and_mean_over_layers():
    phy2log = torch.tensor([[0, 2, 3, 0, 1, 1], [0, 1, 2, 3, 3, 3]])
    loads = torch.tensor([[8, 4, 2, 2], [4, 4, 4, 0]])
    report = metrics.score(phy2log, loads, slots_per_rank=3)
    # layer 0: ranks 4+2+2 and 4+2+2; layer 1: ranks 12 and 0 -> max/mean 2
    assert report.imbalance == pytest.approx([1.0, 2.0])
    assert report.mean_imbalance == pytest.approx(1.5)
    assert report.mean_balancedness == pytest.approx(0.75)
    assert report.worst_imbalance == pytest.approx(2.0)
    doc = report.to_dict()
    assert doc["per_layer_balancedness"] == pytest.approx([1.0, 0.5])


def test_layer_without_load_counts_as_balanced():
    report = metrics.score(torch.tensor([[0, 1, 0, 1]]), torch.zeros(1, 2), slots_per_rank=2)
    assert report.imbalance == [1.0] and report.balancedness == [1.0]


def test_placement_object_and_slots_changed():
    a = Placement.identity(2, 4, num_ranks=2, slots_per_rank=3)
    loads = torch.tensor([[1, 1, 1, 1], [4, 0, 0, 0]])
    report = metrics.score(a, loads)
    # identity with 2 spare slots repeats experts 0, 1: layer 1 puts expert 0 on both ranks
    assert report.imbalance == pytest.approx([1.0, 1.0])
    b = Placement(2, 4, 2, 1, 3, a.phy2log.clone())
    b.phy2log[1, :2] = torch.tensor([1, 0])
    assert metrics.slots_changed(a, b) == 2
    with pytest.raises(ValueError, match="different shapes"):
        metrics.slots_changed(a.phy2log, a.phy2log[:1])


def test_rank_loads_conserve_tokens():
    g = torch.Generator().manual_seed(0)
    loads = torch.randint(0, 1000, (5, 16), generator=g)
    phy2log = torch.stack([torch.cat([torch.randperm(16, generator=g), torch.randint(0, 16, (8,), generator=g)]) for _ in range(5)])
    ranks = metrics.rank_loads(phy2log, loads, slots_per_rank=6)
    torch.testing.assert_close(ranks.sum(1), loads.sum(1).double())


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="same L"):
        metrics.slot_loads(torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="not a whole number of ranks"):
        metrics.rank_loads(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 2), slots_per_rank=2)
    with pytest.raises(ValueError, match="slots_per_rank is needed"):
        metrics.score(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 2))
