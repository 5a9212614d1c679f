"""Pieces of the expert-parallel MoE, in one process (no process group): routing, grouped GEMM,
the receive-side slot reconstruction, seeded experts, the stack at world size 1 against
transformers' MoE, in-place placement switches, the emulated per-rank rows, bench helpers."""

from __future__ import annotations

import argparse

import pytest
import torch

from omni_passes.ep.comm import EPGroup, local_slot_of_rows, padded_rows
from omni_passes.ep.emulate import rows_per_rank, source_tables
from omni_passes.ep.grouped_gemm import grouped_mm, grouped_mm_loop
from omni_passes.ep.moe import ExpertParallelMoE
from omni_passes.ep.routing import deepseek_topk
from omni_passes.ep.weights import MoELayerWeights, MoESpec, SeededExperts
from omni_passes.placement.placement import Placement, PlacementError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    from omni_passes.ep.checks import tiny_moe_layers

    config, moes = tiny_moe_layers()
    return MoESpec.from_hf_config(config), moes


def test_routing_matches_transformers_router(tiny) -> None:
    spec, moes = tiny
    hidden = torch.randn(37, spec.hidden_size, generator=torch.Generator().manual_seed(1))
    for moe in moes:
        _, ref_weights, ref_ids = moe.gate(hidden)
        weights, ids = deepseek_topk(hidden, moe.gate.weight, moe.gate.e_score_correction_bias, spec)
        assert torch.equal(ids, ref_ids)
        assert torch.equal(weights, ref_weights)
    # The group limit bites: every token's experts lie in topk_group of the n_group groups.
    groups = ids // (spec.num_experts // spec.n_group)
    assert max(len(set(row.tolist())) for row in groups) <= spec.topk_group


def test_grouped_mm_loop_equals_per_group_matmul() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(11, 8, generator=g), torch.randn(4, 8, 6, generator=g)
    offs = torch.tensor([3, 3, 9, 9], dtype=torch.int32)  # groups 1 and 3 empty; rows 9-10 past the end
    out = grouped_mm_loop(x, w, offs)
    torch.testing.assert_close(out[:3], x[:3] @ w[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[3:9], x[3:9] @ w[2], rtol=1e-6, atol=1e-6)
    assert torch.equal(out[9:], torch.zeros(2, 6))
    compiled = torch.compile(lambda a, b, o: grouped_mm(a, b, o) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, w, offs), out * 2)


def test_grouped_mm_bf16_native_path() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 16, generator=g).bfloat16()
    w = torch.randn(3, 32, 16, generator=g).bfloat16().transpose(1, 2)  # [G, K=16, M=32], as slots are stored
    offs = torch.tensor([5, 12, 20], dtype=torch.int32)
    expected = torch.cat([x[:5].float() @ w[0].float(), x[5:12].float() @ w[1].float(), x[12:].float() @ w[2].float()])
    torch.testing.assert_close(grouped_mm(x, w, offs).float(), expected, rtol=2e-2, atol=2e-2)


def test_local_slot_of_rows_rebuilds_slots_from_counts() -> None:
    # 2 sources, 3 local slots: source 0 sends 2 rows to slot 0 and 1 to slot 2; source 1 sends 1 to slot 1.
    counts = torch.tensor([2, 0, 1, 0, 1, 0])
    slots = local_slot_of_rows(counts, 3, num_rows=4, padded=padded_rows(4))
    assert slots.tolist() == [0, 0, 2, 1, 3, 3, 3, 3]
    assert [padded_rows(n) for n in (0, 1, 8, 9)] == [8, 8, 8, 16]


def test_seeded_experts_do_not_depend_on_who_asks() -> None:
    spec = MoESpec(16, 8, 6, 2)
    source = SeededExperts(spec, layer=2, seed=5)
    full = source.stacked()
    gate_up, down = torch.empty(2, 16, 16), torch.empty(2, 16, 8)
    source.fill(torch.tensor([4, 1]), gate_up, down)
    assert torch.equal(gate_up, full.gate_up[[4, 1]]) and torch.equal(down, full.down[[4, 1]])
    assert not torch.equal(full.gate_up[0], SeededExperts(spec, layer=3, seed=5).stacked().gate_up[0])


def _world1(spec, moes, placement, backend=None) -> ExpertParallelMoE:
    layers = [MoELayerWeights.from_hf_moe(m) for m in moes]
    return ExpertParallelMoE(spec, layers, placement, EPGroup(0, 1, CPU), compile_backend=backend)


def test_world1_stack_equals_transformers_and_switches_in_place(tiny) -> None:
    spec, moes = tiny
    hidden = torch.randn(9, spec.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        references = [m(hidden.unsqueeze(0)).squeeze(0) for m in moes]
    identity = Placement.identity(len(moes), spec.num_experts, 1, slots_per_rank=20)
    ep = _world1(spec, moes, identity, backend="aot_eager")
    for row, reference in enumerate(references):
        torch.testing.assert_close(ep.forward_layer(row, hidden), reference, rtol=1e-5, atol=1e-7)
    # Hot experts 5 and 9 take the 4 spare slots of every layer instead of experts 0-3.
    phy2log = identity.phy2log.clone()
    phy2log[:, 16:] = torch.tensor([5, 9, 5, 9])
    gate_up_tensor = ep.gate_up[0]
    moved = ep.apply(Placement(len(moes), spec.num_experts, 1, 1, 20, phy2log))
    assert moved == 4 * len(moes)
    assert ep.gate_up[0] is gate_up_tensor  # rewritten in place
    assert torch.equal(ep.gate_up[0][16], moes[0].experts.gate_up_proj[5])
    assert ep.controller.replica_count[0, 5] == 3 and ep.controller.replica_count[0, 0] == 1
    for row, reference in enumerate(references):
        torch.testing.assert_close(ep.forward_layer(row, hidden), reference, rtol=1e-5, atol=1e-7)
    # Loads were recorded per logical expert: every token's K choices, each forward.
    assert int(ep.controller.expert_load.sum()) == 2 * len(moes) * hidden.shape[0] * spec.top_k


def test_placements_that_do_not_fit_are_refused(tiny) -> None:
    spec, moes = tiny
    two_ranks = Placement.identity(len(moes), spec.num_experts, 2, slots_per_rank=8)
    with pytest.raises(PlacementError, match="placement is for 2 ranks but the expert-parallel group has 1"):
        _world1(spec, moes, two_ranks)
    ep = _world1(spec, moes, Placement.identity(len(moes), spec.num_experts, 1, slots_per_rank=16))
    with pytest.raises(PlacementError, match="17 slots"):
        ep.apply(Placement.identity(len(moes), spec.num_experts, 1, slots_per_rank=17))
    with pytest.raises(PlacementError, match="2 MoE layers"):
        ep.apply(Placement.identity(2, spec.num_experts, 1, slots_per_rank=16))


def test_emulated_rows_follow_the_dispatch_tables() -> None:
    # 4 experts on 2 ranks x 3 slots; expert 0 has a replica on each rank (slots 0 and 3).
    placement = Placement(1, 4, 2, 1, 3, torch.tensor([[0, 1, 2, 0, 3, 1]]))
    ids = [torch.tensor([[0, 3], [0, 2], [1, 3]]), torch.tensor([[0, 1], [2, 3]])]
    received = rows_per_rank(placement, 0, ids, source_tables(placement, CPU))
    assert sum(r.numel() for r in received) == 10
    # Source 0 holds experts 0, 1, 2 and keeps them local; expert 3 (slot 4) goes to rank 1.
    # Source 1 serves experts 0 and 1 from its own slots 3 and 5; expert 2 goes to rank 0.
    assert sorted(received[0].tolist()) == [0, 0, 1, 2, 2]
    assert sorted(received[1].tolist()) == [0, 1, 1, 1, 2]  # local slots on rank 1: 3→0, 4→1, 5→2


def test_bench_resolve_names_bad_values() -> None:
    from omni_passes.bench import ep as bench
    from omni_passes.cli.common import UserError

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    cfg = bench.resolve(parser.parse_args(["--backend", "gloo", "--world-size", "3"]))
    assert (cfg["shape"], cfg["slots_per_rank"], cfg["dtype"]) == ("tiny", 6 + 1, "fp32")
    with pytest.raises(UserError, match="cannot hold 16 experts"):
        bench.resolve(parser.parse_args(["--backend", "gloo", "--world-size", "3", "--slots-per-rank", "5"]))
    with pytest.raises(UserError, match="--trace nope: unknown"):
        bench.resolve(parser.parse_args(["--backend", "gloo", "--trace", "nope"]))
    if torch.cuda.device_count() < 2:
        with pytest.raises(UserError, match="world size 2 needs 2 CUDA devices"):
            bench.resolve(parser.parse_args(["--backend", "nccl", "--world-size", "2"]))


def test_bench_summary_takes_the_slowest_rank_per_step() -> None:
    from omni_passes.bench.ep import summarise

    cfg = {"layers": 2, "steps": 2}
    phases = {"prepare_ms": 0, "dispatch_ms": 0, "experts_ms": 0, "return_ms": 0, "combine_ms": 0}

    def rank(r, step_ms, rows, experts):
        ph = {k[:-3]: 0.0 for k in phases} | {"experts": experts}
        return {"rank": r, "placements": {"identity": {"step_ms": step_ms, "recv_rows": rows, "phase_ms_per_step": ph,
                                                       "slots_rewritten": [], "apply_s": []}}}

    reports = [rank(0, [10.0, 4.0], [6, 2, 6, 2], 3.0), rank(1, [5.0, 8.0], [2, 2, 2, 2], 1.0)]
    out = summarise(cfg, ["identity"], reports, {"identity": 1.5})["identity"]
    assert out["step_ms"]["mean"] == 9.0  # max(10, 5) and max(4, 8)
    assert out["moe_layer_ms"] == 4.5
    assert out["measured_load_imbalance"] == pytest.approx((6 / 4 + 2 / 2) / 2)
    assert out["expert_time_imbalance"] == pytest.approx(3.0 / 2.0)
    assert [e["rows_per_step"] for e in out["per_rank"]] == [8.0, 4.0]
