"""Correctness run of the expert-parallel stack against a single-device reference.

``check_worker`` runs on every rank (``run_workers(check_worker, W, "gloo", (case_path,))``).
The case file (``torch.save``) holds what the caller computed on one device:

    spec          MoESpec fields
    layers        per MoE layer: router, bias, gate_up [E, 2I, H], down [E, H, I], shared_*
    inputs        per MoE layer: the reference's input tokens [N, H] (all ranks' tokens)
    outputs       per MoE layer: the reference MoE output for them [N, H]
    rank_tokens   per rank: (start, stop) rows of the N tokens that rank serves
    placements    list of (name, placement dict): the first is built, the others applied in place
    backend       torch.compile backend of the regions, or None
    rebalance     RebalanceConfig fields for an in-place rebalance at the end, or None

Every rank runs its tokens through every layer after each placement (and after the rebalance)
and returns the largest difference to the reference (relative to the reference's largest value) per placement, how many graphs
were compiled, and what it holds (slot experts, placement fingerprint).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from omni_passes.config import RebalanceConfig
from omni_passes.ep.comm import EPGroup
from omni_passes.ep.moe import ExpertParallelMoE
from omni_passes.ep.rebalance import DistributedRebalancer
from omni_passes.ep.weights import MoELayerWeights, MoESpec, TensorExperts
from omni_passes.placement.placement import Placement


def _layers(case: dict) -> list[MoELayerWeights]:
    return [
        MoELayerWeights(
            router=w["router"], bias=w["bias"], experts=TensorExperts(w["gate_up"], w["down"]),
            shared_gate=w.get("shared_gate"), shared_up=w.get("shared_up"), shared_down=w.get("shared_down"),
        )
        for w in case["layers"]
    ]


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _max_diff(ep: ExpertParallelMoE, case: dict, rank: int, repeats: int = 1) -> list[float]:
    """Per layer: max |EP - reference| over this rank's tokens, relative to max |reference|."""
    start, stop = case["rank_tokens"][rank]
    diffs = []
    for row in range(ep.num_layers):
        reference = case["outputs"][row][start:stop].float()
        scale = reference.abs().max().item() if stop > start else 1.0
        worst = 0.0
        for _ in range(repeats):
            hidden = case["inputs"][row][start:stop].to(ep.group.device)
            out = ep.forward_layer(row, hidden).float().cpu()
            worst = max(worst, (out - reference).abs().max().item() / scale if stop > start else 0.0)
        diffs.append(worst)
    return diffs


def _slots_hold_their_experts(ep: ExpertParallelMoE, case: dict) -> bool:
    for row in range(ep.num_layers):
        experts = ep.local_experts(row)
        for held, name in ((ep.gate_up[row], "gate_up"), (ep.down[row], "down")):
            if not torch.equal(held.cpu(), case["layers"][row][name][experts].to(held.dtype)):
                return False
    return True


def check_worker(group: EPGroup, case_path: str) -> dict:
    case = torch.load(case_path, weights_only=False)
    spec = MoESpec(**case["spec"])
    (first_name, first), *rest = case["placements"]
    dtype = getattr(torch, case.get("dtype", "float32"))
    ep = ExpertParallelMoE(
        spec, _layers(case), Placement.from_dict(first), group, dtype=dtype, compile_backend=case["backend"]
    )
    report: dict = {"rank": group.rank, "placements": {}}
    # Twice: the second pass runs on warm compiled regions with other receive sizes.
    report["placements"][first_name] = {"max_rel_diff": _max_diff(ep, case, group.rank, repeats=2), "slots_rewritten": 0}
    graphs_after_first = _compiled_graphs()
    for name, placement in rest:
        rewritten = ep.apply(Placement.from_dict(placement))
        report["placements"][name] = {
            "max_rel_diff": _max_diff(ep, case, group.rank),
            "slots_rewritten": rewritten,
            "slots_ok": _slots_hold_their_experts(ep, case),
        }
    if case.get("rebalance"):
        rebalancer = DistributedRebalancer(ep, RebalanceConfig(**case["rebalance"]))
        event = None
        for _ in range(rebalancer.config.interval_steps):
            _max_diff(ep, case, group.rank)  # a serving step: records this rank's loads
            event = rebalancer.step() or event
        report["rebalance"] = {
            "applied": bool(event and event.applied),
            "moves": event.moves if event else 0,
            "max_rel_diff": _max_diff(ep, case, group.rank),
            "slots_ok": _slots_hold_their_experts(ep, case),
        }
    report["graphs_after_first_placement"] = graphs_after_first
    report["graphs_at_end"] = _compiled_graphs()
    fingerprints = [None] * group.world_size
    dist.all_gather_object(fingerprints, ep.placement.fingerprint())
    report["placement_fingerprints"] = fingerprints
    report["local_experts"] = [ep.local_experts(r).tolist() for r in range(ep.num_layers)]
    return report


# ---- building a case (in the calling process; needs transformers) ------------------------------
def tiny_moe_layers(seed: int = 3, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The tiny DeepSeek-V3's transformers config and its ``DeepseekV3MoE`` modules."""
    from omni_passes.models import build_model, load_hf_config

    config = load_hf_config("tiny")
    model = build_model(config, dtype=dtype, device=device, seed=seed)
    return config, [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]


def trace_loads(num_layers: int, num_experts: int, top_k: int, num_groups: int) -> np.ndarray:
    """``[40, L, E]`` skewed per-step loads from the trace generator (what placements plan on)."""
    from omni_passes.placement import traces

    spec = traces.get_spec(
        "deepseek-translation", num_layers=num_layers, num_experts=num_experts, top_k=top_k,
        num_groups=num_groups, steps=40, tokens_per_step=64,
    )
    return traces.generate(spec).numpy()


def plan_placements(world: int, slots: int, loads: np.ndarray, num_groups: int, workdir: Path) -> list[tuple[str, dict]]:
    """identity, vLLM's EPLB (skipped without vLLM) and ours, written by ``omni-passes plan``."""
    from omni_passes.cli import main as omni_passes_main

    num_layers, num_experts = loads.shape[1:]
    found = [("identity", Placement.identity(num_layers, num_experts, world, slots_per_rank=slots).to_dict())]
    try:
        from omni_passes.placement.eplb_peer import eplb_plan

        found.append(("eplb", eplb_plan(torch.from_numpy(loads.sum(0)), world, 1, slots, num_groups=num_groups).to_dict()))
    except ImportError:
        pass
    np.save(workdir / "loads.npy", loads)
    out = workdir / "ours.json"
    argv = ["plan", "--loads", str(workdir / "loads.npy"), "--ranks", str(world), "--slots-per-rank", str(slots),
            "--groups", str(num_groups), "--out", str(out)]
    if omni_passes_main(argv) != 0:
        raise RuntimeError(f"omni-passes {' '.join(argv)} failed")
    found.append(("ours", json.loads(out.read_text())))
    return found


def build_case(
    world: int, slots: int, workdir: Path, backend: str | None, dtype: str = "float32", device: str = "cpu",
    rebalance: dict | None = None,
) -> tuple[str, dict]:
    """Reference outputs of the tiny DeepSeek-V3's MoE layers for uneven per-rank batches, the
    placements, and what the workers need; saved to ``workdir/case.pt`` (path returned)."""
    torch_dtype = getattr(torch, dtype)
    config, moes = tiny_moe_layers(dtype=torch_dtype, device=device)
    spec = MoESpec.from_hf_config(config)
    sizes = [5 + 3 * r for r in range(world)]
    bounds = np.cumsum([0] + sizes).tolist()
    hidden = torch.randn(sum(sizes), spec.hidden_size, generator=torch.Generator().manual_seed(world))
    hidden = hidden.to(device, torch_dtype)
    inputs, outputs = [], []
    with torch.no_grad():
        for moe in moes:
            out = moe(hidden.unsqueeze(0)).squeeze(0)
            inputs.append(hidden.cpu().clone())
            outputs.append(out.cpu().clone())
            hidden = hidden + out
    loads = trace_loads(len(moes), spec.num_experts, spec.top_k, spec.n_group)
    case = {
        "spec": spec.__dict__,
        "layers": [
            {
                "router": m.gate.weight.detach().cpu().clone(),
                "bias": m.gate.e_score_correction_bias.detach().float().cpu().clone(),
                "gate_up": m.experts.gate_up_proj.detach().cpu().clone(),
                "down": m.experts.down_proj.detach().cpu().clone(),
                "shared_gate": m.shared_experts.gate_proj.weight.detach().cpu().clone(),
                "shared_up": m.shared_experts.up_proj.weight.detach().cpu().clone(),
                "shared_down": m.shared_experts.down_proj.weight.detach().cpu().clone(),
            }
            for m in moes
        ],
        "inputs": inputs,
        "outputs": outputs,
        "rank_tokens": [(bounds[r], bounds[r + 1]) for r in range(world)],
        "placements": plan_placements(world, slots, loads, spec.n_group, workdir),
        "backend": backend,
        "dtype": dtype,
        "rebalance": rebalance,
    }
    path = workdir / "case.pt"
    torch.save(case, path)
    return str(path), case


def problems(reports: list[dict], case: dict, rtol: float) -> list[str]:
    """What is wrong with the workers' reports (empty: the run equals the reference)."""
    found = []
    slots = case["placements"][0][1]["slots_per_rank"]
    if len({fp for r in reports for fp in r["placement_fingerprints"]}) != 1:
        found.append("ranks ended on different placements")
    for report in reports:
        rank = report["rank"]
        for name, _ in case["placements"]:
            got = report["placements"][name]
            if max(got["max_rel_diff"]) >= rtol:
                found.append(f"rank {rank} placement {name}: relative difference {got['max_rel_diff']} >= {rtol}")
            if not got.get("slots_ok", True):
                found.append(f"rank {rank} placement {name}: slots do not hold their experts")
        rebalance = report.get("rebalance")
        if case.get("rebalance"):
            if not (rebalance["applied"] and rebalance["moves"] > 0):
                found.append(f"rank {rank}: the rebalance moved nothing: {rebalance}")
            if max(rebalance["max_rel_diff"]) >= rtol:
                found.append(f"rank {rank} after rebalance: relative difference {rebalance['max_rel_diff']}")
            if not rebalance["slots_ok"]:
                found.append(f"rank {rank} after rebalance: slots do not hold their experts")
        if case["backend"] and report["graphs_at_end"] != report["graphs_after_first_placement"]:
            found.append(
                f"rank {rank}: applying placements recompiled ({report['graphs_after_first_placement']} graphs "
                f"before, {report['graphs_at_end']} after)"
            )
        if case["backend"] and report["graphs_after_first_placement"] == 0:
            found.append(f"rank {rank}: backend {case['backend']} compiled nothing")
    for layer in range(len(case["layers"])):
        held = {e for report in reports for e in report["local_experts"][layer]}
        if held != set(range(case["spec"]["num_experts"])):
            found.append(f"layer {layer}: the ranks together hold experts {sorted(held)}, not all")
        if any(len(report["local_experts"][layer]) != slots for report in reports):
            found.append(f"layer {layer}: a rank holds other than {slots} slots")
    return found
