"""`omni-passes plan`: recorded expert loads → redundant-expert placement JSON.

    omni-passes plan --loads loads.npy --ranks 64 --nodes 8 --slots-per-rank 5 --out placement.json
    omni-passes plan --loads series.npy --ranks 32 --nodes 4 --slots-per-rank 9 --groups 8 \\
        --previous placement.json --max-moves 2000 --out next.json --json

``--loads`` is ``[moe_layers, experts]`` token counts, or ``[steps, moe_layers, experts]``
(then planned on a forecast of the next window; see ``planner.forecast_loads``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from omni_passes.cli.common import UserError, emit_json, say, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads", required=True, metavar="FILE.npy", help="[layers, experts] or [steps, layers, experts]")
    parser.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks R")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the ranks are spread over (R divisible by it)")
    parser.add_argument("--slots-per-rank", type=int, required=True, help="expert slots per rank S (R*S >= experts)")
    parser.add_argument("--groups", type=int, default=1, help="expert groups (DeepSeek n_group); hierarchical if divisible by nodes")
    parser.add_argument("--max-replicas", type=int, default=None, help="cap on replicas of one expert")
    parser.add_argument("--previous", metavar="P.json", help="current placement: keep slots in place where the gain is small")
    parser.add_argument("--min-gain", type=float, default=0.005,
                        help="with --previous: a layer changes only if its balancedness rises by this much (default 0.005)")
    parser.add_argument("--max-moves", type=int, default=None, help="with --previous: most slots changed in total")
    parser.add_argument("--no-forecast", action="store_true", help="plan a [steps, ...] file on its sum, not a forecast")
    parser.add_argument("--out", required=True, metavar="placement.json")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def main(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        return _run(args)
    except UserError as exc:
        say(f"omni-passes plan: error: {exc}")
        return 2


def load_loads(path: str) -> np.ndarray:
    """The loads array from a .npy file; UserError naming the file otherwise."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"--loads {path}: no such file")
    try:
        array = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"--loads {path}: not a .npy array ({exc})") from None
    if array.ndim not in (2, 3):
        raise UserError(f"--loads {path}: shape {array.shape}; expected [moe_layers, experts] or [steps, moe_layers, experts]")
    return array


def _run(args: argparse.Namespace) -> int:
    from omni_passes.placement import metrics
    from omni_passes.placement.placement import Placement, PlacementError
    from omni_passes.placement.forecast import forecast_loads
    from omni_passes.placement.planner import PlanError, PlanOptions, check_inputs, plan

    loads = load_loads(args.loads)
    previous = None
    if args.previous:
        try:
            previous = Placement.load(args.previous)
        except PlacementError as exc:
            raise UserError(str(exc)) from None
    sizes = (args.ranks, args.nodes, args.slots_per_rank, args.groups, args.max_replicas, previous)
    try:
        checked = check_inputs(loads, *sizes)
        start = time.perf_counter()
        half_life = None
        if checked.ndim == 3:
            expected, half_life = (checked.sum(axis=0), None) if args.no_forecast else forecast_loads(checked)
        else:
            expected = checked
        placement = plan(
            expected, *sizes, options=PlanOptions(min_gain=args.min_gain if previous else 0.0, max_moves=args.max_moves)
        )
        plan_ms = (time.perf_counter() - start) * 1e3
    except PlanError as exc:
        raise UserError(f"--loads {args.loads}: {exc}" if "loads" in str(exc) else str(exc)) from None
    try:
        placement.save(args.out)
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot write ({exc})") from None

    target = torch.from_numpy(expected)
    identity = Placement.identity(placement.num_layers, placement.num_logical_experts, args.ranks, args.nodes, args.slots_per_rank)
    reports = {"identity": metrics.score(identity, target), "planned": metrics.score(placement, target)}
    if previous is not None:
        reports["previous"] = metrics.score(previous, target)
    document = {
        "out": args.out,
        "num_layers": placement.num_layers,
        "num_logical_experts": placement.num_logical_experts,
        "num_ranks": args.ranks,
        "num_nodes": args.nodes,
        "slots_per_rank": args.slots_per_rank,
        "num_redundant": placement.num_redundant,
        "planned_on": ("sum" if args.no_forecast else "forecast") if loads.ndim == 3 else "loads",
        "forecast_half_life_steps": half_life,
        "plan_ms": plan_ms,
        "moves": metrics.slots_changed(previous, placement) if previous is not None else None,
        "balance": {name: report.to_dict(per_layer=(name == "planned")) for name, report in reports.items()},
    }
    if args.json:
        emit_json(document)
        return 0
    print(f"wrote {args.out}: {placement.num_layers} MoE layers x {placement.num_logical_experts} experts on "
          f"{args.ranks} ranks ({args.nodes} nodes) x {args.slots_per_rank} slots, {placement.num_redundant} redundant")
    print(f"{'placement':<10} {'mean balancedness':>18} {'mean max/mean':>14} {'worst max/mean':>15}")
    for name, report in reports.items():
        print(f"{name:<10} {report.mean_balancedness:>18.4f} {report.mean_imbalance:>14.3f} {report.worst_imbalance:>15.3f}")
    extra = f", moved {document['moves']} slots" if previous is not None else ""
    print(f"planned in {plan_ms:.1f} ms{extra}")
    return 0
