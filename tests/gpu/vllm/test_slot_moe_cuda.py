"""Redundant experts in vLLM 0.26 CUDA: the omni MoE op under CUDA graphs (skipped without CUDA
and vLLM's CUDA build).

1. The dispatch-and-count kernel (``kernels.triton_slot_dispatch``) on the GPU without an engine:
   the same rows and counts as the PyTorch path for decode and prefill sizes, and inside a CUDA
   graph replayed after its ids, tables (in place), gate and padding mask changed.
2. Real engines on a tiny random DeepSeek-V3 with sm_90 MLA dims (3 MoE layers, 16 experts, top-4,
   biased sigmoid routing: vLLM's fused grouped top-k kernel), bf16, CUDA graphs for batches
   1, 2, 4, 8, prefix caching off, each engine in a child process with its engine core in that
   process (``omni_passes.testing.vllm_cuda_engine``; vLLM's multiprocess engine core hung on
   the GPU machine). Five prompts: decode batches of 5 run padded to the captured size 8, so a
   count that took the padding rows would be 3 x top-k too high per step.

   * ``off``: vLLM as it is (the reference tokens); ``off_fdo``: the same in FULL_DECODE_ONLY.
   * ``identity``: the passes with the identity placement, then two permutations applied in
     place, vLLM's compile cache on; ``identity_warm``: the same configuration started again on
     that cache (nothing compiled: the runtime is built at the first op call).
   * ``redundant``: 4 redundant slots (4 emulated ranks x 5 slots), online rebalancing every 24
     steps, then another redundant placement applied in place.
   * ``fdo``: a redundant placement with ``cudagraph_mode=FULL_DECODE_ONLY`` (full graphs for
     decode, no graphs for prefill), then another applied in place.

   * ``off_fp32`` / ``redundant_fp32``: float32. Every MLA backend of vLLM 0.26 CUDA takes
     bf16/fp16 only, so these run DeepSeek's attention decompressed (``VLLM_MLA_DISABLE=1``) on
     ``TRITON_ATTN``; the MoE op and the passes are the same. Redundant slots, a rebalance and a
     placement applied in place, in float32 (last in this file: the bf16 results come first).

Exactness is asserted as tokens equal to passes-off, in bfloat16 and float32: the omni op runs
vLLM's own router and its Triton experts kernel with the tile configuration of E rows, so every
token's output has the same bits whichever row serves it.

Runtime on an H100: about eight minutes (eight engine starts of about a minute; the warm start less).
``OMNI_PASSES_GRAPH_DUMP=DIR`` in the environment makes each engine with the passes save the
graphs vLLM gives them under ``DIR/<engine>/`` (the fixture of
tests/unit/test_moe_forward_slots_pass.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu  # skipped without CUDA and vLLM's CUDA build: conftest.py

from omni_passes.placement.placement import Placement
from omni_passes.testing.placements import permuted, redundant_permuted
from omni_passes.testing.vllm_cuda_engine import EngineFailed, run_child

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A mixture of experts model sends every token",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64",
    "Compilers trace a program into a graph, rewrite the graph,",
    "Once upon a time",
]
MAX_TOKENS = 16
TOP_K, EXPERTS, MOE_LAYERS = 4, 16, 3          # the tiny checkpoint's (omni_passes.testing.vllm_cuda_dump)
RANKS, SLOTS_PER_RANK = 4, 5                   # 20 slots: 4 redundant
REBALANCE = {"interval_steps": 24, "window_steps": 24, "min_gain": 0.0, "layer_min_gain": 0.0, "max_moves": 8}
TIMEOUT = 420  # per engine: a hung one prints every thread's stack 30 s before (vllm_cuda_engine --hang-dump)


# ----------------------------------------------------------------------------- 1. the kernel
def _tables(experts: int, width: int, slots: int, gen: torch.Generator):
    table = torch.randint(0, slots, (2, experts, width), device="cuda", generator=gen)
    count = torch.randint(1, width + 1, (2, experts), device="cuda", generator=gen)
    return table, count


@pytest.mark.parametrize("tokens", [1, 5, 64, 683, 2730, 2731, 8192])  # x6 entries; 2731 and up: past PAIRWISE_LIMIT
def test_dispatch_kernel_matches_the_pytorch_path(tokens):
    from kernels.state import register_state, unregister_state
    from kernels.triton_slot_dispatch import slot_dispatch_count
    from kernels.vllm_slot_moe import dispatch_and_count, dispatch_and_count_reference

    gen = torch.Generator(device="cuda").manual_seed(tokens)
    experts, top_k, slots = 64, 6, 72
    table, count = _tables(experts, 9, slots, gen)
    hot = torch.softmax(torch.randn(experts, device="cuda", generator=gen) * 1.5, 0)
    ids = torch.multinomial(hot.expand(tokens, experts).contiguous(), top_k, generator=gen).to(torch.int32)
    mask = torch.rand(tokens + 3, device="cuda", generator=gen) > 0.2

    def state():
        return {"replica_slots": table, "replica_count": count, "gate": torch.ones(1, dtype=torch.int64, device="cuda"),
                "expert_load": torch.zeros(2, experts, dtype=torch.int64, device="cuda"),
                "row_load": torch.zeros(2, slots, dtype=torch.int64, device="cuda")}

    ref, ours, chosen = state(), state(), state()
    handles = [register_state(ref), register_state(ours), register_state(chosen)]
    try:
        expected = dispatch_and_count_reference(handles[0], 1, ids, mask[:tokens])
        got = slot_dispatch_count(ids, table[1], count[1], ours["expert_load"][1], ours["row_load"][1], ours["gate"], mask)
        routed = dispatch_and_count(handles[2], 1, ids, mask[:tokens])  # what the op calls: Triton up to the limit
        for result, counters in ((got, ours), (routed, chosen)):
            assert torch.equal(result, expected)
            assert torch.equal(counters["expert_load"], ref["expert_load"])
            assert torch.equal(counters["row_load"], ref["row_load"])
        assert int(ref["expert_load"][1].sum()) == int(mask[:tokens].sum()) * top_k and ref["expert_load"][0].sum() == 0
    finally:
        for h in handles:
            unregister_state(h)


def test_dispatch_kernel_replayed_from_a_cuda_graph_reads_live_tables_gate_and_mask():
    from kernels.expert_dispatch import expert_dispatch_reference
    from kernels.triton_slot_dispatch import slot_dispatch_count

    gen = torch.Generator(device="cuda").manual_seed(1)
    experts, top_k, slots, tokens = 16, 4, 20, 8
    table, count = _tables(experts, 5, slots, gen)
    ids = torch.zeros(tokens, top_k, dtype=torch.int32, device="cuda")
    mask = torch.ones(tokens, dtype=torch.bool, device="cuda")
    gate = torch.zeros(1, dtype=torch.int64, device="cuda")
    e_load = torch.zeros(experts, dtype=torch.int64, device="cuda")
    r_load = torch.zeros(slots, dtype=torch.int64, device="cuda")
    out = torch.zeros_like(ids)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        slot_dispatch_count(ids, table[0], count[0], e_load, r_load, gate, mask)  # compiled outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(slot_dispatch_count(ids, table[0], count[0], e_load, r_load, gate, mask))
    expected_e = torch.zeros_like(e_load)
    expected_r = torch.zeros_like(r_load)
    for step in range(4):
        ids.copy_(torch.stack([torch.randperm(experts, device="cuda", generator=gen)[:top_k] for _ in range(tokens)]))
        new_table, new_count = _tables(experts, 5, slots, gen)
        table.copy_(new_table)       # a placement applied in place
        count.copy_(new_count)
        gate.fill_(step % 2 + step // 3)  # 0, 1, 0, 2
        real = 5 + step % 3
        mask[:real].fill_(True)
        mask[real:].fill_(False)
        graph.replay()
        rows = expert_dispatch_reference(ids, table, count, 0)
        assert torch.equal(out, rows), step
        add = gate.expand(tokens * top_k) * mask.long().repeat_interleave(top_k)
        expected_e.index_add_(0, ids.flatten().long(), add)
        expected_r.index_add_(0, rows.flatten().long(), add)
        assert torch.equal(e_load, expected_e) and torch.equal(r_load, expected_r), step
    assert e_load.sum() > 0


# ----------------------------------------------------------------------------- 2. engines
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slot_moe_cuda")


@pytest.fixture(scope="module")
def model_dir(work) -> Path:
    from omni_passes.testing.vllm_cuda_dump import build_checkpoint

    return build_checkpoint(work / "tiny_dsv3_sm90")


def _save(placement: Placement, path: Path) -> str:
    placement.save(path)
    return str(path)


def _config(work: Path, name: str, **extra) -> str:
    path = work / f"{name}.json"
    path.write_text(json.dumps({"passes": ["redundant_experts"], "report_path": str(work / f"{name}_report.json"),
                                **extra}))
    return str(path)


def _engine(name: str, model_dir: Path, work: Path, **kwargs) -> dict:
    env = dict(os.environ)
    if env.get("OMNI_PASSES_GRAPH_DUMP"):  # one folder per engine: piece numbers restart in every process
        env["OMNI_PASSES_GRAPH_DUMP"] = str(Path(env["OMNI_PASSES_GRAPH_DUMP"]) / name)
    kwargs.setdefault("cache_root", work / f"cache-{name}")
    try:
        return run_child(model_dir, PROMPTS, MAX_TOKENS, timeout=TIMEOUT, env=env, **kwargs)
    except EngineFailed as exc:
        pytest.fail(f"engine {name}: {exc}"[-12000:])


@pytest.fixture(scope="module")
def off(model_dir, work):
    return _engine("off", model_dir, work)


@pytest.fixture(scope="module")
def off_fdo(model_dir, work):
    return _engine("off_fdo", model_dir, work, cudagraph_mode="FULL_DECODE_ONLY")


@pytest.fixture(scope="module")
def identity(model_dir, work):
    g = torch.Generator().manual_seed(11)
    chain = [_save(permuted(MOE_LAYERS, EXPERTS, g), work / f"perm{i}.json") for i in range(2)]
    return _engine("identity", model_dir, work, pass_config=_config(work, "identity"), compile_cache=True,
                   cache_root=work / "cache-identity", phases=[{"rounds": 1}] + [{"apply": p, "rounds": 1} for p in chain])


@pytest.fixture(scope="module")
def identity_warm(identity, model_dir, work):  # after ``identity``: its compile cache exists
    return _engine("identity_warm", model_dir, work, pass_config=_config(work, "identity"), compile_cache=True,
                   cache_root=work / "cache-identity", phases=[{"rounds": 1}])


def _redundant(work: Path, name: str, seed: int) -> str:
    return _save(redundant_permuted(MOE_LAYERS, EXPERTS, RANKS * SLOTS_PER_RANK - EXPERTS, torch.Generator().manual_seed(seed),
                                    ranks=RANKS), work / f"{name}.json")


@pytest.fixture(scope="module")
def redundant(model_dir, work):
    config = _config(work, "redundant", placement=_redundant(work, "red0", 3), rebalance=REBALANCE)
    # 16 steps per generate: the first rebalance lands in the second phase (steps 17-48)
    return _engine("redundant", model_dir, work, pass_config=config,
                   phases=[{"rounds": 1}, {"rounds": 2}, {"apply": _redundant(work, "red1", 4), "rounds": 1}])


@pytest.fixture(scope="module")
def fdo(model_dir, work):
    config = _config(work, "fdo", placement=_redundant(work, "fdo0", 5))
    return _engine("fdo", model_dir, work, pass_config=config, cudagraph_mode="FULL_DECODE_ONLY",
                   phases=[{"rounds": 1}, {"apply": _redundant(work, "fdo1", 6), "rounds": 1}])


def _tokens(result: dict) -> list[list[list[int]]]:
    """Every round's greedy tokens, in order."""
    return [r["token_ids"] for phase in result["phases"] for r in phase["rounds"]]


def _processed_tokens(round_: dict) -> int:
    """Tokens one round ran through the model: every prompt token (no prefix caching), and every
    generated token but the last (it is sampled, never fed back)."""
    return sum(len(p) for p in round_["prompt_token_ids"]) + sum(len(t) - 1 for t in round_["token_ids"])


# ---- greedy tokens: passes off == every placement, before and after every change ------------------
def test_identity_and_in_place_permutations_give_the_tokens_of_passes_off(off, identity):
    reference = off["phases"][0]["rounds"][0]["token_ids"]
    assert len({tuple(t) for t in reference}) == len(PROMPTS)  # not degenerate: a wrong expert would show
    for i, tokens in enumerate(_tokens(identity)):
        assert tokens == reference, f"round {i} (placements applied before it: {i})"
    assert identity["phases"][-1]["status"]["placement_updates"] == 2


def test_redundant_slots_and_online_rebalancing_give_the_tokens_of_passes_off(off, redundant):
    reference = off["phases"][0]["rounds"][0]["token_ids"]
    for i, tokens in enumerate(_tokens(redundant)):
        assert tokens == reference, f"round {i}"
    events = redundant["phases"][1]["status"]["rebalance_events"]
    assert any(e["applied"] for e in events), events         # the placement changed while serving
    assert all(e["moves"] <= REBALANCE["max_moves"] for e in events)
    last = redundant["phases"][-1]
    assert last["applied"]["placement"] == Placement.load(last["apply"]).fingerprint()
    assert last["status"]["rows_copied"] > 0                 # replicas of other experts were written


def test_full_decode_only_tokens_equal_passes_off_in_that_mode(off_fdo, fdo):
    assert off_fdo["engine"]["cudagraph_mode"].endswith("FULL_DECODE_ONLY")
    reference = off_fdo["phases"][0]["rounds"][0]["token_ids"]
    for i, tokens in enumerate(_tokens(fdo)):
        assert tokens == reference, f"round {i}"


# ---- counts under CUDA-graph replay, padding excluded ----------------------------------------------
@pytest.mark.parametrize("name", ["identity", "redundant", "fdo"])
def test_loads_count_every_processed_token_times_top_k_on_graph_replays(name, request):
    result = request.getfixturevalue(name)
    mode = result["engine"]["cudagraph_mode"]
    assert mode.endswith("FULL_DECODE_ONLY" if name == "fdo" else "FULL_AND_PIECEWISE"), mode
    assert result["engine"]["top_k"] == TOP_K and 8 in result["engine"]["cudagraph_capture_sizes"]
    processed = 0
    for phase in result["phases"]:
        processed += sum(_processed_tokens(r) for r in phase["rounds"])
        status = phase["status"]
        experts = torch.tensor(status["total_expert_load"])
        slots = torch.tensor(status["total_slot_load"])
        assert experts.shape == (MOE_LAYERS, EXPERTS)
        # Every MoE layer counted each processed token K times: no padding row of the batches
        # vLLM padded to a captured size (5 -> 8), no warm-up or capture batch.
        assert experts.sum(1).tolist() == [processed * TOP_K] * MOE_LAYERS, (phase["apply"], processed)
        assert slots.sum(1).tolist() == [processed * TOP_K] * MOE_LAYERS
        assert status["serving_steps"] > 0


@pytest.mark.parametrize("name", ["redundant", "fdo"])
def test_slot_loads_add_up_to_the_logical_loads_and_split_replicas(name, request):
    status = request.getfixturevalue(name)["phases"][0]["status"]  # the starting placement, nothing moved yet
    assert status["placement_updates"] == 0 and not status.get("rebalance_events")
    phy2log = torch.tensor(status["placement"]["phy2log"])
    experts, slots = torch.tensor(status["total_expert_load"]), torch.tensor(status["total_slot_load"])
    per_expert = torch.zeros_like(experts).scatter_add_(1, phy2log, slots)
    assert torch.equal(per_expert, experts)
    # A replicated expert's tokens are split over its slots per layer call (the j-th occurrence in
    # the batch takes replica j mod c): prefill batches reach every replica of a busy expert,
    # single-token decode steps only the first.
    split = []
    for layer in range(MOE_LAYERS):
        for expert in phy2log[layer].unique().tolist():
            holders = (phy2log[layer] == expert).nonzero().flatten()
            if len(holders) > 1:
                split.append(bool(slots[layer, holders].min() > 0))
    assert len(split) >= MOE_LAYERS and any(split), split


# ---- no recompiles, compile cache -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["identity", "redundant", "fdo"])
def test_in_place_placements_and_rebalancing_compile_nothing(name, request):
    statuses = [p["status"] for p in request.getfixturevalue(name)["phases"]]
    first = statuses[0]
    assert first["graphs_compiled"] >= 1 and first["dynamo_unique_graphs"] >= 1
    for status in statuses[1:]:
        assert status["graphs_compiled"] == first["graphs_compiled"]
        assert status["dynamo_unique_graphs"] == first["dynamo_unique_graphs"]
    assert statuses[-1]["placement_updates"] >= 1


def test_report_serves_every_moe_layer_with_the_omni_op(identity):
    entry = identity["phases"][0]["status"]["report"]["passes"]["redundant_experts"]
    assert entry["rewritten_nodes"] >= 1 and not entry["skipped"], entry
    assert sorted(entry["matched_layers"]) == [1, 2, 3]        # layer 0 is dense


def test_a_second_start_hits_the_compile_cache_and_serves_the_same_tokens(identity, identity_warm):
    cold, warm = identity["phases"][0], identity_warm["phases"][0]
    assert cold["status"]["from_compile_cache"] is False and cold["status"]["graphs_compiled"] >= 1
    assert warm["status"]["graphs_compiled"] == 0, "the pass ran again: vLLM's compile cache was missed"
    assert warm["status"]["from_compile_cache"] is True
    assert warm["rounds"][0]["token_ids"] == cold["rounds"][0]["token_ids"]
    processed = _processed_tokens(warm["rounds"][0])
    assert torch.tensor(warm["status"]["total_expert_load"]).sum(1).tolist() == [processed * TOP_K] * MOE_LAYERS
    assert warm["status"]["placement"] == cold["status"]["placement"]


# ---- float32 (attention decompressed: no MLA backend of vLLM 0.26 CUDA takes float32) -------------
FP32 = {"dtype": "float32", "no_mla": True, "attention_backend": "TRITON_ATTN"}


@pytest.fixture(scope="module")
def off_fp32(model_dir, work):
    return _engine("off_fp32", model_dir, work, **FP32)


@pytest.fixture(scope="module")
def redundant_fp32(model_dir, work):
    config = _config(work, "redundant_fp32", placement=_redundant(work, "red32_0", 7), rebalance=REBALANCE)
    return _engine("redundant_fp32", model_dir, work, pass_config=config, **FP32,
                   phases=[{"rounds": 1}, {"rounds": 2}, {"apply": _redundant(work, "red32_1", 8), "rounds": 1}])


def test_float32_redundant_slots_and_rebalancing_give_the_tokens_of_passes_off(off_fp32, redundant_fp32):
    reference = off_fp32["phases"][0]["rounds"][0]["token_ids"]
    assert len({tuple(t) for t in reference}) == len(PROMPTS)
    for i, tokens in enumerate(_tokens(redundant_fp32)):
        assert tokens == reference, f"round {i}"
    events = redundant_fp32["phases"][1]["status"]["rebalance_events"]
    assert any(e["applied"] for e in events), events
    processed = sum(_processed_tokens(r) for phase in redundant_fp32["phases"] for r in phase["rounds"])
    status = redundant_fp32["phases"][-1]["status"]
    assert torch.tensor(status["total_slot_load"]).sum(1).tolist() == [processed * TOP_K] * MOE_LAYERS
    assert redundant_fp32["phases"][-1]["applied"]["placement"] == Placement.load(
        redundant_fp32["phases"][-1]["apply"]).fingerprint()
