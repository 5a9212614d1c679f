"""`omni-passes bench vllm --device cuda` (redundant experts on vLLM CUDA) without a GPU: which runs
select it, the skewed gates, the HBM floor's rows, balancedness, the summary and its goals from a
recorded result, the figure and the printout. The engines themselves run on the GPU machine
(tools/gpu_moe.sh)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from omni_passes.bench import vllm as bench_vllm
from omni_passes.bench import vllm_moe_cuda, vllm_moe_figures
from omni_passes.bench.vllm_moe_engine import skewed_gate, zipf_scales


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_vllm.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_device_cuda_selects_the_moe_benchmark_unless_kv_is_asked_for(tmp_path):
    assert bench_vllm.wants_moe_cuda_bench(parse("--device", "cuda"))
    assert bench_vllm.wants_moe_cuda_bench(parse("--device", "cuda", "--moe-rounds", "2"))
    assert not bench_vllm.wants_moe_cuda_bench(parse("--device", "cuda", "--kv"))
    # tools/gpu_kv.sh's command line: a --kv-* option means the KV benchmark
    assert not bench_vllm.wants_moe_cuda_bench(parse("--device", "cuda", "--kv-budget-s", "360", "--kv-work-dir", "/tmp/x"))
    assert not bench_vllm.wants_moe_cuda_bench(parse())
    kv = tmp_path / "kv.json"
    kv.write_text(json.dumps({"passes": ["sparse_attention"], "sparse_attention": {"pattern": [1], "free_kv": True}}))
    assert not bench_vllm.wants_moe_cuda_bench(parse("--device", "cuda", "--pass-config", str(kv)))


# ---------------------------------------------------------------------------- skewed gates
def test_skewed_gates_are_deterministic_and_give_uneven_loads_of_the_promised_shape():
    experts, hidden, top_k = 64, 2048, 6
    norm = torch.empty(hidden).uniform_(-1e-3, 1e-3, generator=torch.Generator().manual_seed(5))  # vLLM's dummy init
    weight, scales = skewed_gate(norm, experts, layer=3, seed=0, alpha=0.3, target_std=1.0)
    again, _ = skewed_gate(norm, experts, layer=3, seed=0, alpha=0.3, target_std=1.0)
    other, _ = skewed_gate(norm, experts, layer=4, seed=0, alpha=0.3, target_std=1.0)
    assert torch.equal(weight, again) and not torch.equal(weight, other)
    assert scales.mean().item() == pytest.approx(1.0) and scales.max() / scales.min() == pytest.approx(64 ** 0.3, rel=1e-5)
    # hidden states as the layer's RMSNorm gives them (unit-RMS rows times the norm weight)
    x = torch.randn(6000, hidden, generator=torch.Generator().manual_seed(1))
    h = x / x.pow(2).mean(1, keepdim=True).sqrt() * norm
    logits = (h.bfloat16() @ weight.bfloat16().T).float()
    assert logits.std().item() == pytest.approx(1.0, rel=0.15)                    # target_std
    ids = torch.softmax(logits, -1).bfloat16().topk(top_k).indices              # vLLM: softmax, greedy top-k
    loads = torch.bincount(ids.flatten(), minlength=experts).double()
    shape = vllm_moe_figures.load_imbalance(loads[None])
    assert 2.5 < shape["max_over_mean"] < 4.0 and 0.2 < shape["min_over_mean"] < 0.6, shape
    assert torch.equal(loads.argsort(descending=True)[:3], scales.argsort(descending=True)[:3])  # the wide experts are hot


def test_zipf_scales_are_a_permutation_of_one_profile():
    a = zipf_scales(8, 0.5, torch.Generator().manual_seed(0))
    b = zipf_scales(8, 0.5, torch.Generator().manual_seed(1))
    assert torch.allclose(a.sort().values, b.sort().values) and not torch.equal(a, b)


# ---------------------------------------------------------------------------- floors
def test_rows_touched_follows_the_occurrence_rule():
    load = torch.tensor([4.0, 2.0, 1.0, 1.0])
    one = torch.ones(4, dtype=torch.int64)
    two = torch.full((4,), 2)
    # batch 1 reads exactly K rows, whatever the replicas (a lone token takes replica 0)
    assert vllm_moe_figures.rows_touched(load, one, 1, 2) == pytest.approx(2.0)
    assert vllm_moe_figures.rows_touched(load, two, 1, 2) == pytest.approx(2.0)
    # one replica: sum_e 1 - (1 - K p_e)^B
    p = 2 * load / load.sum()
    expected = float((1 - (1 - p.clamp(max=1)) ** 3).sum())
    assert vllm_moe_figures.rows_touched(load, one, 3, 2) == pytest.approx(expected)
    # a second replica is read iff the expert gets two or more tokens in the step
    extra = sum(1 - (1 - q) ** 3 - 3 * q * (1 - q) ** 2 for q in p.clamp(max=1).tolist())
    assert vllm_moe_figures.rows_touched(load, two, 3, 2) == pytest.approx(expected + extra)
    assert vllm_moe_figures.rows_touched(load, two, 10_000, 2) == pytest.approx(8.0)


def test_decode_floor_adds_weights_rows_and_kv():
    weights = {"dense_bytes": 1000, "expert_row_bytes": 10}
    loads = torch.ones(2, 4)
    floor = vllm_moe_figures.decode_floor_bytes(weights, loads, torch.ones(2, 4, dtype=torch.int64), 1, 100, 7, 2)
    assert floor["rows"] == pytest.approx(4.0)  # two layers, K=2 rows each
    assert floor == {"weights": 1040, "experts": 40, "kv": 700, "total": 1740, "rows": floor["rows"]}


def test_rank_balancedness_and_replicas():
    slots = [[1, 1, 2, 0], [3, 3, 3, 3]]          # 2 ranks of 2 slots
    assert vllm_moe_figures.rank_balancedness(slots, 2) == pytest.approx((1.0 + 1.0) / 2)
    assert vllm_moe_figures.rank_balancedness([[4, 0, 0, 0]], 2) == pytest.approx(0.5)
    assert vllm_moe_figures.replicas_of([[0, 1, 0, 2]], 3).tolist() == [[2, 1, 1]]


# ---------------------------------------------------------------------------- summary, goals, plot, print
def _round(batch: int, tps: float, tpot: float) -> dict:
    return {"batch": batch, "tokens_per_s": tps, "tpot_s": tpot, "context": 544, "gave_up": None}


def recorded_result(tmp_path) -> dict:
    config = {"num_hidden_layers": 3, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
              "kv_lora_rank": 8, "qk_rope_head_dim": 8}
    ready = {"startup_s": 60.0, "weights": {"dense_bytes": 10**9, "expert_row_bytes": 10**7},
             "copy_bandwidth": {"bytes_per_s": 3e12}}
    loads = [[8, 4, 2, 2], [4, 4, 4, 4]]
    identity_status = {"total_expert_load": loads, "total_slot_load": loads,
                       "placement": {"phy2log": [[0, 1, 2, 3]] * 2}}
    redundant_status = {"total_expert_load": loads, "total_slot_load": [[4, 4, 4, 2, 2, 0], [4, 4, 4, 4, 0, 0]],
                        "placement": {"phy2log": [[0, 1, 2, 3, 0, 1]] * 2}}
    engines = {
        "off": {"ready": ready, "rounds": [_round(1, 100.0, 0.004), _round(64, 3000.0, 0.016)]},
        "identity": {"ready": ready, "status": identity_status, "placement": identity_status["placement"],
                     "rounds": [_round(1, 99.0, 0.00401), _round(64, 2995.0, 0.01602)]},
        "redundant": {"ready": ready, "status": redundant_status, "placement": redundant_status["placement"],
                      "rounds": [_round(1, 99.0, 0.00402), _round(64, 2950.0, 0.0168)]},
        "rebalance": {"ready": ready, "balance": {"rounds": [{"balancedness": 0.8}, {"balancedness": 0.96}],
                                                   "events": [{"applied": True}]},
                      "rounds": [_round(64, 2900.0, 0.0166)]},
        "off_warm": {"ready": dict(ready, startup_s=30.0), "rounds": [_round(1, 101.0, 0.00399)]},
        "identity_warm": {"ready": dict(ready, startup_s=31.0), "status": identity_status,
                          "rounds": [_round(1, 100.0, 0.004)]},
    }
    return {"model_config": config, "engines": engines, "gpu": "test", "wall_s": 1.0, "skipped": {},
            "workload": {"batches": "1,64", "rounds": 1, "prompt_tokens": 512, "output_tokens": 64},
            "slots_per_rank": {"identity": 2, "redundant": 3, "rebalance": 3}}


def test_summary_gives_ratios_floors_balance_and_goals(tmp_path):
    result = recorded_result(tmp_path)
    s = vllm_moe_figures.summarize(result)
    identity = s["engines"]["identity"]["batches"]
    assert identity[1]["tokens_per_s_vs_off"] == pytest.approx(99.0 / 100.5)     # off's rounds pooled (cold and warm)
    assert identity[64]["tpot_vs_off"] == pytest.approx(0.01602 / 0.016)
    red = s["engines"]["redundant"]["batches"][64]
    assert red["floor_bytes"]["rows"] > s["engines"]["off"]["batches"][64]["floor_bytes"]["rows"]  # replicas read more rows
    assert red["floor_s"] == pytest.approx(red["floor_bytes"]["total"] / 3e12)
    assert s["balancedness"]["rebalance_before"] == 0.8 and s["balancedness"]["rebalance_after"] == 0.96
    assert s["balancedness"]["identity"] == pytest.approx(np.mean([16 / 2 / 12, 1.0]))
    goals = {g["goal"]: g for g in s["goals"]}
    assert not goals["identity output tokens/s at batch 1 / passes off"]["met"]            # 0.985
    assert goals["balancedness over 8 emulated ranks after online rebalancing"]["met"]
    assert goals["warm start, passes on / passes off"]["value"] == pytest.approx(31 / 30)
    cost = goals["redundant (8 slots per layer) TPOT cost at batch 64"]
    assert cost["value"] == pytest.approx(0.0168 / 0.016 - 1) and cost["met"] is False and "floor grows" in cost["why_not"]
    result["summary"] = s
    path = vllm_moe_cuda.plot(result, tmp_path / "plot")
    assert (tmp_path / "plot" / "vllm_moe_cuda.png").exists() and path.endswith("vllm_moe_cuda.png")


def test_printout_names_every_figure(tmp_path, capsys):
    result = recorded_result(tmp_path)
    result["summary"] = vllm_moe_figures.summarize(result)
    result["engines"]["rebalance"]["error"] = "RuntimeError: boom\ntraceback"
    vllm_moe_cuda.print_summary(result)
    out = capsys.readouterr().out
    assert "identity: start 60.0 s, copy 3.00 TB/s" in out and "rebalance: FAILED: RuntimeError: boom" in out
    assert "B64: 2995 tok/s, TPOT 16.02 ms (floor" in out and "GOAL met: balancedness" in out


# ---------------------------------------------------------------------------- files
def test_recorded_loads_fall_back_to_the_status_when_the_file_lags(tmp_path):
    status = {"total_expert_load": [[3, 1], [2, 2]]}
    np.save(tmp_path / "identity_loads.npy", np.array([[3, 1], [2, 2]]))
    assert vllm_moe_cuda.recorded_loads(tmp_path, status).name == "identity_loads.npy"
    np.save(tmp_path / "identity_loads.npy", np.array([[3, 1], [0, 0]]))  # written before the last steps
    fallback = vllm_moe_cuda.recorded_loads(tmp_path, status)
    assert fallback.name == "identity_loads_from_status.npy" and np.load(fallback).tolist() == [[3, 1], [2, 2]]


def test_configs_and_the_naive_start(tmp_path):
    from omni_passes.config import PassConfig
    from omni_passes.placement.placement import Placement

    naive = Placement.load(vllm_moe_cuda.naive_placement(tmp_path, 26, 64))
    assert (naive.num_ranks, naive.slots_per_rank, naive.num_redundant) == (8, 9, 8)
    assert naive.phy2log[0, 64:].tolist() == list(range(8))
    config = PassConfig.load(vllm_moe_cuda.pass_config(tmp_path, "rebalance", placement=str(tmp_path / "naive_placement.json"),
                                                       rebalance=vllm_moe_cuda.REBALANCE))
    assert config.rebalance.interval_steps == 32 and config.expert_load_path.endswith("rebalance_loads.npy")
    assert vllm_moe_cuda.moe_layers({"num_hidden_layers": 27, "first_k_dense_replace": 1}) == 26
    assert math.isclose(vllm_moe_cuda._estimate("off_warm", {"off": 100.0}), 60.0)


def test_same_tokens_compares_rounds_of_the_same_workload():
    off = {"rounds": [{"batch": 1, "seed": 7, "tokens_sha1": "a"}, {"batch": 64, "seed": 8, "tokens_sha1": "b"}]}
    mine = [{"batch": 1, "seed": 7, "tokens_sha1": "a"}, {"batch": 64, "seed": 8, "tokens_sha1": "x"},
            {"batch": 16, "seed": 9, "tokens_sha1": "c"}]  # off never ran this one
    assert vllm_moe_figures.same_tokens(mine, {"off": off, "identity": {"rounds": mine}}) == {"equal": 1, "compared": 2}


def test_every_batch_is_warmed_up_before_the_timed_rounds():
    """The engine's command sequence (the engine process itself needs the GPU): one untimed
    round per batch, then the timed rounds batch by batch, none sharing a workload seed."""

    class Commands:
        name = "identity"

        def __init__(self):
            self.asked = []

        def ask(self, command, value):
            self.asked.append((command, value))
            return {"tokens_per_s": 1.0, "tpot_s": 1e-3, "gave_up": 0, **value}

    engine, record = Commands(), {}
    vllm_moe_cuda.measure(engine, record, parse("--device", "cuda", "--moe-rounds", "2"), save=lambda: None)
    tags = [value["tag"] for _, value in engine.asked]
    assert tags == ["warm1-", "warm16-", "warm64-", "r0b1-", "r0b16-", "r0b64-", "r1b1-", "r1b16-", "r1b64-"]
    assert [r["tag"] for r in record["rounds"]] == tags[3:]
    seeds = [value["seed"] for _, value in engine.asked]
    assert len(set(seeds)) == len(seeds)
