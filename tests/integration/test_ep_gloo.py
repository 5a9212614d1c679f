"""Expert parallelism on CPU with gloo: W spawned ranks equal the single-device reference.

The reference is transformers' own ``DeepseekV3MoE`` (the tiny DeepSeek-V3, 3 MoE layers,
16 experts, top-4 of 4 groups, a shared expert) on all tokens in this process. Each rank
serves a different number of those tokens through ``ExpertParallelMoE`` with only its
placement's slots; after the identity placement, vLLM's EPLB placement and ours (written by
``omni-passes plan``) are applied in place, then an online rebalance decided on rank 0 from
the loads recorded on all ranks. After each, every rank's outputs must equal the reference's
rows for its tokens, its slots must hold exactly its experts, and no region may recompile.
"""

from __future__ import annotations

import pytest
import torch

from omni_passes.ep.checks import build_case, check_worker, problems
from omni_passes.ep.launch import run_workers

pytestmark = pytest.mark.slow

SLOTS_PER_RANK = {2: 10, 3: 6, 4: 5}  # 16 experts: 4, 2 and 4 redundant slots
RTOL = 1e-5  # of the largest reference value; a row sent to the wrong expert is off by ~1
REBALANCE = {"window_steps": 4, "interval_steps": 2, "min_gain": 0.0, "layer_min_gain": 0.0}


# World size 2 runs the serving configuration (regions compiled by Inductor, and checked not
# to recompile when placements change); 3 and 4 run the regions eagerly, which keeps the whole
# file near a minute on 2 cores (each Inductor rank compiles 6 graphs).
@pytest.mark.parametrize("world, backend", [(2, "inductor"), (3, None), (4, None)])
def test_ep_equals_reference_gloo(world: int, backend: str | None, tmp_path) -> None:
    path, case = build_case(world, SLOTS_PER_RANK[world], tmp_path, backend, rebalance=REBALANCE)
    names = [name for name, _ in case["placements"]]
    assert names[0] == "identity" and names[-1] == "ours"
    # The placements differ and replicate, or equality would prove little.
    ours = torch.tensor(case["placements"][-1][1]["phy2log"])
    assert not torch.equal(torch.tensor(case["placements"][0][1]["phy2log"]), ours)
    assert all(int(torch.bincount(row).max()) > 1 for row in ours), "ours has a layer without replicas"

    reports = run_workers(check_worker, world, "gloo", (path,))

    assert problems(reports, case, RTOL) == []
    for report in reports:
        assert set(report["placements"]) == set(names)
        assert report["rebalance"]["applied"]


def _bench_json(capsys, argv: list[str]) -> dict:
    import json

    from omni_passes.cli import main as omni_passes_main

    assert omni_passes_main(argv) == 0
    return json.loads(capsys.readouterr().out)  # --json: exactly one document on stdout


def test_bench_ep_gloo_smoke(capsys) -> None:
    """`omni-passes bench ep` on 2 gloo ranks: every routed row is computed somewhere, once."""
    doc = _bench_json(capsys, ["bench", "ep", "--world-size", "2", "--backend", "gloo", "--layers", "2",
                               "--tokens", "16", "--steps", "2", "--rounds", "1", "--no-compile",
                               "--placements", "identity", "ours", "--json"])
    cfg = doc["config"]
    assert (cfg["world_size"], cfg["shape"], cfg["slots_per_rank"]) == (2, "tiny", 9)
    routed = cfg["tokens_per_rank"] * cfg["spec"]["top_k"] * cfg["world_size"] * cfg["layers"]
    for name in ("identity", "ours"):
        result = doc["results"][name]
        assert sum(r["rows_per_step"] for r in result["per_rank"]) == routed
        assert result["step_ms"]["mean"] > 0 and result["moe_layer_ms"] == result["step_ms"]["mean"] / 2
    assert doc["results"]["ours"]["slots_rewritten_per_apply"][0] > 0
    # Planned on the trace's past, ours is predicted better balanced than identity on its future.
    assert doc["results"]["ours"]["predicted_imbalance"] < doc["results"]["identity"]["predicted_imbalance"]


def test_bench_ep_emulated_ranks(capsys) -> None:
    doc = _bench_json(capsys, ["bench", "ep", "--world-size", "4", "--backend", "gloo", "--emulate-ranks",
                               "--layers", "2", "--tokens", "16", "--steps", "2", "--no-compile",
                               "--placements", "identity", "ours", "--json"])
    routed = 16 * 4 * 4 * 2  # tokens x top-k x ranks x layers per step
    for result in doc["results"].values():
        assert sum(r["rows_per_step"] for r in result["per_rank"]) == routed
        assert len(result["per_rank"]) == 4
    assert doc["results"]["ours"]["rank_load_imbalance"] < doc["results"]["identity"]["rank_load_imbalance"]
