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
    rebalance     RebalancerConfig fields for an in-place rebalance at the end, or None

Every rank runs its tokens through every layer after each placement (and after the rebalance)
and returns the largest difference to the reference (relative to the reference's largest value) per placement, how many graphs
were compiled, and what it holds (slot experts, placement fingerprint).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from omni_passes.ep.comm import EPGroup
from omni_passes.ep.moe import ExpertParallelMoE
from omni_passes.ep.rebalance import DistributedRebalancer
from omni_passes.ep.weights import MoELayerWeights, MoESpec, TensorExperts
from omni_passes.placement.placement import Placement
from omni_passes.placement.rebalancer import RebalancerConfig


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
        reference = case["outputs"][row][start:stop]
        scale = reference.abs().max().item() if stop > start else 1.0
        worst = 0.0
        for _ in range(repeats):
            out = ep.forward_layer(row, case["inputs"][row][start:stop])
            worst = max(worst, (out - reference).abs().max().item() / scale if stop > start else 0.0)
        diffs.append(worst)
    return diffs


def _slots_hold_their_experts(ep: ExpertParallelMoE, case: dict) -> bool:
    for row in range(ep.num_layers):
        experts = ep.local_experts(row)
        if not torch.equal(ep.gate_up[row], case["layers"][row]["gate_up"][experts]):
            return False
        if not torch.equal(ep.down[row], case["layers"][row]["down"][experts]):
            return False
    return True


def check_worker(group: EPGroup, case_path: str) -> dict:
    case = torch.load(case_path, weights_only=False)
    spec = MoESpec(**case["spec"])
    (first_name, first), *rest = case["placements"]
    ep = ExpertParallelMoE(spec, _layers(case), Placement.from_dict(first), group, compile_backend=case["backend"])
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
        rebalancer = DistributedRebalancer(ep, RebalancerConfig(**case["rebalance"]))
        event = None
        for _ in range(rebalancer.config.interval):
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
