"""omni::expert_dispatch and omni::record_expert_load against references: eager, compiled with
their Inductor lowerings (static and dynamic shapes, every occurrence/count formulation) and
compiled with the eager kernels; tensor-side gate; tables updated in place."""

import pytest
import torch

import kernels  # noqa: F401
from kernels.expert_dispatch import expert_dispatch_reference
from omni_passes.placement.placement import Placement
from omni_passes.placement.controller import PlacementController
from omni_passes.placement.tables import dispatch_tables


def placement(rows, experts, ranks=1, slots_per_rank=None):
    rows = torch.tensor(rows, dtype=torch.int64)
    return Placement(
        num_layers=rows.shape[0], num_logical_experts=experts, num_ranks=ranks, num_nodes=1,
        slots_per_rank=slots_per_rank or rows.shape[1] // ranks, phy2log=rows,
    )


def test_identity_placement_maps_ids_to_themselves():
    state = PlacementController(Placement.identity(2, 8), layout="slot")
    ids = torch.randint(0, 8, (37, 3))
    for layer in range(2):
        out = torch.ops.omni.expert_dispatch(ids, state.handle, layer)
        assert torch.equal(out, ids)
        assert out.dtype == ids.dtype


def test_replicas_split_tokens_evenly_and_deterministically():
    # expert 0 has 3 replicas (slots 0, 4, 5), expert 1 has 2 (1, 6), others 1.
    p = placement([[0, 1, 2, 3, 0, 0, 1]], experts=4)
    state = PlacementController(p, layout="slot")
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [0, 1], [2, 0], [0, 3]])
    slots = torch.ops.omni.expert_dispatch(ids, state.handle, 0)
    # Every slot holds the expert the token chose.
    assert torch.equal(p.phy2log[0][slots], ids)
    # Occurrences of expert 0 in token order go to replicas 0,1,2,0,1,2,...
    zeros = slots[ids == 0].tolist()
    assert zeros == [0, 4, 5, 0, 4, 5, 0]
    assert slots[ids == 1].tolist() == [1, 6, 1]
    assert torch.equal(slots, torch.ops.omni.expert_dispatch(ids, state.handle, 0))


def test_split_is_even_within_one_token_on_random_batches():
    generator = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.arange(16), torch.randint(0, 16, (16,), generator=generator)]).unsqueeze(0)
    p = placement(rows.tolist(), experts=16)
    replica_slots, replica_count = dispatch_tables(p)
    ids = torch.randint(0, 16, (500, 8), generator=generator)
    slots = expert_dispatch_reference(ids, replica_slots, replica_count, 0)
    per_slot = torch.bincount(slots.flatten(), minlength=32)
    for expert in range(16):
        holders = (p.phy2log[0] == expert).nonzero().flatten()
        counts = per_slot[holders]
        assert int(counts.sum()) == int((ids == expert).sum())
        assert int(counts.max() - counts.min()) <= 1


def test_local_rank_replica_preferred():
    # 2 ranks x 3 slots; expert 0 on rank 0 (slot 0) and rank 1 (slot 4); expert 1 only on rank 0.
    p = placement([[0, 1, 2, 3, 0, 2]], experts=4, ranks=2, slots_per_rank=3)
    state = PlacementController(p, layout="slot", local_rank=1)
    ids = torch.tensor([[0, 1], [0, 2], [0, 3]])
    slots = torch.ops.omni.expert_dispatch(ids, state.handle, 0)
    assert slots[:, 0].tolist() == [4, 4, 4]        # expert 0: only the local replica
    assert slots[0, 1].item() == 1                  # expert 1 has no local replica: remote one
    assert slots[1, 1].item() == 5                  # expert 2: local slot 5 preferred over slot 2
    assert torch.equal(p.phy2log[0][slots], ids)


def test_record_expert_load_equals_bincount():
    state = PlacementController(Placement.identity(3, 10), layout="slot")
    generator = torch.Generator().manual_seed(1)
    expected = torch.zeros(3, 10, dtype=torch.int64)
    for _ in range(5):
        layer = int(torch.randint(0, 3, (1,), generator=generator))
        ids = torch.randint(0, 10, (13, 4), generator=generator)
        torch.ops.omni.record_expert_load(ids, state.handle, layer)
        expected[layer] += torch.bincount(ids.flatten(), minlength=10)
    assert torch.equal(state.expert_load, expected)
    assert torch.equal(state.take_load(), expected)
    assert int(state.expert_load.sum()) == 0


def test_ops_compile_fullgraph_and_tables_update_without_recompile():
    from torch._dynamo.utils import counters

    p_a = placement([[0, 1, 2, 3, 0, 1, 2, 3]], experts=4)
    p_b = placement([[0, 1, 2, 3, 3, 2, 1, 0]], experts=4)
    state = PlacementController(p_a, layout="slot")

    def route(ids):
        torch.ops.omni.record_expert_load(ids, state.handle, 0)
        return torch.ops.omni.expert_dispatch(ids, state.handle, 0) * 1

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(route, fullgraph=True, backend="inductor")
    ids = torch.tensor([[0, 0], [1, 1], [2, 3], [3, 2]])
    out_a = compiled(ids)
    assert torch.equal(out_a, expert_dispatch_reference(ids, *dispatch_tables(p_a), 0))
    frames = counters["stats"]["unique_graphs"]
    state.apply(p_b)
    out_b = compiled(ids)
    assert torch.equal(out_b, expert_dispatch_reference(ids, *dispatch_tables(p_b), 0))
    assert not torch.equal(out_a, out_b)
    assert counters["stats"]["unique_graphs"] == frames  # no recompile
    assert torch.equal(state.expert_load[0], 2 * torch.bincount(ids.flatten(), minlength=4))


def test_unknown_state_handle_is_a_clear_error():
    with pytest.raises(LookupError, match="not registered"):
        torch.ops.omni.expert_dispatch(torch.zeros(2, 2, dtype=torch.int64), 10**9, 0)


def test_layer_out_of_range_is_a_clear_error():
    state = PlacementController(Placement.identity(2, 4), layout="slot")
    with pytest.raises(IndexError, match="layer 5 out of range"):
        torch.ops.omni.expert_dispatch(torch.zeros(2, 2, dtype=torch.int64), state.handle, 5)


@pytest.fixture(params=["lowered", "eager-kernels"])
def inductor_mode(request, monkeypatch):
    from kernels import inductor_lowerings

    assert inductor_lowerings.register()
    monkeypatch.setenv(inductor_lowerings.ENV, "1" if request.param == "lowered" else "0")
    torch._inductor.config.fx_graph_cache, saved = False, torch._inductor.config.fx_graph_cache
    yield request.param
    torch._inductor.config.fx_graph_cache = saved


# (tokens, dynamic): pairwise occurrence + reduced counts, one-hot cumsum + reduced counts,
# one-hot cumsum + index_put counts (symbolic size)
@pytest.mark.parametrize("tokens, dynamic", [(5, False), (300, False), (37, True)])
def test_compiled_ops_equal_the_reference_and_count_rows(tokens, dynamic, inductor_mode):
    generator = torch.Generator().manual_seed(tokens)
    experts, extra = 16, 9
    rows = torch.stack([torch.cat([torch.arange(experts), torch.randint(0, experts, (extra,), generator=generator)])
                        [torch.randperm(experts + extra, generator=generator)] for _ in range(2)])
    p = placement(rows.tolist(), experts)
    state = PlacementController(p, layout="slot")

    def route(ids):
        torch.ops.omni.record_expert_load(ids, state.handle, 1)
        return torch.ops.omni.expert_dispatch(ids, state.handle, 1) + 0

    torch._dynamo.reset()
    compiled = torch.compile(route, fullgraph=True)
    for n in (tokens, tokens + 3) if dynamic else (tokens,):
        ids = torch.randint(0, experts, (n, 4), generator=generator)
        if dynamic:
            torch._dynamo.mark_dynamic(ids, 0)  # a symbolic token count (the state handle stays a constant)
        ids[: n // 2, 0] = int(rows[1, 0])  # a hot expert: occurrences past its replica count
        state.expert_load.zero_()
        state.row_load.zero_()
        out = compiled(ids)
        expected = expert_dispatch_reference(ids, state.replica_slots, state.replica_count, 1)
        assert torch.equal(out, expected)
        assert torch.equal(p.phy2log[1][out], ids)  # every row holds the chosen expert
        assert torch.equal(state.expert_load[1], torch.bincount(ids.flatten(), minlength=experts))
        assert torch.equal(state.row_load[1], torch.bincount(expected.flatten(), minlength=experts + extra))
        assert int(state.expert_load[0].sum()) == int(state.row_load[0].sum()) == 0
        state.gate.zero_()  # tensor-side gate: the next call counts nothing
        compiled(ids)
        state.gate.fill_(1)
        assert int(state.expert_load.sum()) == int(state.row_load.sum()) == ids.numel()
    state.close()


def test_lowered_dispatch_reads_tables_updated_in_place(inductor_mode):
    from torch._dynamo.utils import counters

    p_a = placement([[0, 1, 2, 3, 0, 1, 2, 3]], experts=4)
    p_b = placement([[0, 1, 2, 3, 3, 2, 1, 0]], experts=4)
    state = PlacementController(p_a, layout="slot")
    compiled = torch.compile(lambda ids: torch.ops.omni.expert_dispatch(ids, state.handle, 0) * 1, fullgraph=True)
    ids = torch.tensor([[0, 0], [1, 1], [2, 3], [3, 2], [0, 1]])
    torch._dynamo.reset()
    counters.clear()
    out_a = compiled(ids)
    state.apply(p_b)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out_b = compiled(ids)
    assert torch.equal(out_a, expert_dispatch_reference(ids, *dispatch_tables(p_a), 0))
    assert torch.equal(out_b, expert_dispatch_reference(ids, *dispatch_tables(p_b), 0))
    assert not torch.equal(out_a, out_b)
    assert counters["stats"]["unique_graphs"] == 1


def test_occurrence_index_formulations_agree():
    from kernels import expert_dispatch as ed

    flat = torch.randint(0, 8, (4000,), generator=torch.Generator().manual_seed(3))
    onehot = ed.occurrence_index(flat, 8)
    saved, ed.ONE_HOT_LIMIT = ed.ONE_HOT_LIMIT, 0
    try:
        sorted_path = ed.occurrence_index(flat, 8)
    finally:
        ed.ONE_HOT_LIMIT = saved
    assert torch.equal(onehot, sorted_path)
    expected = torch.tensor([int((flat[:i] == flat[i]).sum()) for i in range(200)])
    assert torch.equal(onehot[:200], expected)


def test_the_ops_are_lowered_only_where_the_compiled_code_cannot_be_cached(monkeypatch):
    """Lowered code holds the state's tensors as constants; a cache would keep copies of them."""
    from torch._inductor.utils import run_and_get_code

    from kernels import inductor_lowerings

    assert inductor_lowerings.register()
    monkeypatch.setenv(inductor_lowerings.ENV, "1")
    state = PlacementController(placement([[0, 1, 2, 3, 3, 2, 1, 0]], experts=4), layout="slot")
    ids = torch.tensor([[0, 0], [1, 1], [2, 3], [3, 2]])

    def code_with_cache(on: bool) -> str:
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=on):
            compiled = torch.compile(lambda x: torch.ops.omni.expert_dispatch(x, state.handle, 0) * 1, fullgraph=True)
            out, code = run_and_get_code(compiled, ids)
        assert torch.equal(out, expert_dispatch_reference(ids, *dispatch_tables(state.placement), 0))
        return "\n".join(code)

    assert "omni.expert_dispatch" not in code_with_cache(False)  # lowered into the graph's loops
    assert "omni.expert_dispatch" in code_with_cache(True)  # a call that looks the state up
    state.close()


_CACHED_PROCESS = """
import sys, torch
import kernels
from kernels import inductor_lowerings
from kernels.expert_dispatch import expert_dispatch_reference
from omni_passes.placement.controller import PlacementController
from omni_passes.placement.placement import Placement
from omni_passes.placement.tables import dispatch_tables
from torch._dynamo.utils import counters
row = [[0, 1, 2, 3, 0, 1, 2, 3]] if sys.argv[1] == "a" else [[0, 1, 2, 3, 3, 2, 1, 0]]
p = Placement(num_layers=1, num_logical_experts=4, num_ranks=1, num_nodes=1, slots_per_rank=8,
              phy2log=torch.tensor(row))
state = PlacementController(p, layout="slot")
assert inductor_lowerings.register()  # as an omni pass manager does when Inductor first runs it
def route(ids):
    torch.ops.omni.record_expert_load(ids, state.handle, 0)
    return torch.ops.omni.expert_dispatch(ids, state.handle, 0) * 1
ids = torch.tensor([[0, 0], [1, 1], [2, 3], [3, 2]])
out = torch.compile(route, fullgraph=True)(ids)
print(torch.equal(out, expert_dispatch_reference(ids, *dispatch_tables(p), 0)),
      state.expert_load[0].tolist(), counters["inductor"]["fxgraph_cache_hit"])
"""


def test_a_cached_graph_reads_the_tables_and_counters_of_the_process_that_loads_it(tmp_path):
    """Two processes, one Inductor cache, the same graph (same handle literal) and other
    placements: the second is served from the cache and must still dispatch by its own tables
    and count into its own counters."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "PYTHONPATH": str(root),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    lines = [subprocess.run([sys.executable, "-c", _CACHED_PROCESS, which], env=env, cwd=root, check=True,
                            capture_output=True, text=True).stdout.split("\n")[-2] for which in ("a", "b")]
    assert lines[0] == "True [2, 2, 2, 2] 0"
    assert lines[1] == "True [2, 2, 2, 2] 1", "a cache hit must use the loading process's state"
