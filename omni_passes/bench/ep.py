"""`omni-passes bench ep`: expert-parallel MoE on N ranks with identity vs EPLB vs our placement.

    omni-passes bench ep --world-size 4 --backend nccl            # one 4-GPU host
    omni-passes bench ep --world-size 2 --backend gloo --json     # CPU smoke test
    omni-passes bench ep --plan-only --world-size 8 --save-placements DIR   # where vLLM is

What runs: ``--world-size`` spawned ranks (no torchrun), each an ``ExpertParallelMoE`` holding
only its slots of ``--layers`` MoE layers of ``--shape`` (random seeded weights). A *step* is
the MoE-layer stack as a decode-step proxy: ``h = h + moe_l(rms_norm(h))`` for every layer, on
``--tokens`` tokens per rank (data-parallel attention gives every rank its own batch). No
attention runs: it is the same on every rank whatever the placement, so the proxy isolates what
placement changes. Routing follows the skew of a load trace (``--trace``, from
``omni_passes.placement.traces``): at measured step t each rank draws its tokens' top-k experts
from the trace's per-expert distribution of step t and layer l (the gate is not run, so routing
weights are random; the ids are what placement acts on).

Placements, planned in this process on the trace's first ``--plan-steps`` steps and measured on
the ``--steps`` after them (as a serving system plans on the past and runs on the future):
identity (expert e on slot e, spare slots repeat experts), vLLM's EPLB (on the window sum;
needs vllm here, or ``--placement-dir`` holding ``eplb.json`` planned elsewhere) and ours
(``omni_passes.placement.planner`` on its forecast of the window). All run in one process
group: the first is built, the others applied in place (slot weights and tables, no recompile).

Per placement: step time (the slowest rank's, per step) and MoE layer time (step / layers),
and per rank: rows computed (its load), expert GEMM time, exchange and combine times, so a gain
can be traced to balance. Workers always run with NVLink multicast off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from omni_passes.cli.common import UserError, emit_json, say, setup_logging
from omni_passes.ep.weights import MoESpec

# Shapes: DeepSeek-V3 (arXiv 2412.19437: hidden 7168, expert width 2048, 256 routed experts,
# top-8 of 8 groups keeping 4, one shared expert, scaling 2.5) and Qwen3-30B-A3B (hidden 2048,
# expert width 768, 128 experts, top-8, no groups, no shared expert); "tiny" is
# omni_passes.models.TINY_V3's MoE (CPU smoke runs).
SHAPES: dict[str, MoESpec] = {
    "tiny": MoESpec(64, 32, 16, 4, n_group=4, topk_group=2, routed_scaling_factor=2.5, shared_intermediate_size=32),
    "deepseek-v3": MoESpec(7168, 2048, 256, 8, n_group=8, topk_group=4, routed_scaling_factor=2.5, shared_intermediate_size=2048),
    "qwen3-30b-a3b": MoESpec(2048, 768, 128, 8),
}
DEFAULT_TRACE = {"tiny": "deepseek-translation", "deepseek-v3": "deepseek-translation", "qwen3-30b-a3b": "qwen3-30b-a3b"}
PLACEMENTS = ("identity", "eplb", "ours")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--world-size", type=int, default=None, help="ranks (default: visible GPUs with nccl, else 2)")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl" if cuda else "gloo",
                        help="nccl: one GPU per rank; gloo: CPU ranks (smoke test)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="MoE layer shape (default: deepseek-v3 with nccl, tiny with gloo)")
    parser.add_argument("--layers", type=int, default=4, help="MoE layers in the stack (a decode step proxy)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per rank per step (default: 128 nccl, 32 gloo)")
    parser.add_argument("--slots-per-rank", type=int, default=None,
                        help="expert slots per rank (default: ceil(E/W) plus one eighth of that, rounded up)")
    parser.add_argument("--trace", default=None, help="load trace name (omni_passes.placement.traces.TRACES)")
    parser.add_argument("--plan-steps", type=int, default=100, help="trace steps the placements are planned on")
    parser.add_argument("--steps", type=int, default=20, help="trace steps measured (after the planning window)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the first measurement (compiles)")
    parser.add_argument("--rounds", type=int, default=2, help="times each placement is applied and measured, in turn")
    parser.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS))
    parser.add_argument("--placement-dir", metavar="DIR", help="read NAME.json placements from DIR instead of planning")
    parser.add_argument("--save-placements", metavar="DIR", help="write the placements used as DIR/NAME.json")
    parser.add_argument("--plan-only", action="store_true", help="plan (and save) placements, print predicted balance, run nothing")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 with nccl, fp32 with gloo")
    parser.add_argument("--no-compile", action="store_true", help="run the per-rank regions eagerly")
    parser.add_argument("--emulate-ranks", action="store_true",
                        help="one device, no collectives: time each of the --world-size ranks' expert GEMM in turn "
                             "on the rows it would receive (see omni_passes.ep.emulate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--plot", metavar="DIR", help="write per-rank load and time plots (PNG) to DIR")


def main(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        return _run(args)
    except UserError as exc:
        say(f"omni-passes bench ep: error: {exc}")
        return 2


# ---- configuration ---------------------------------------------------------------------------
def resolve(args: argparse.Namespace) -> dict:
    """Defaults filled in and checked; a UserError names a bad value."""
    from omni_passes.ep.launch import check_world
    from omni_passes.placement import traces

    backend = args.backend
    world = args.world_size
    if world is None:
        world = max(torch.cuda.device_count(), 1) if backend == "nccl" and torch.cuda.is_available() else 2
    if world < 1:
        raise UserError(f"--world-size must be >= 1, got {world}")
    if not (args.plan_only or args.emulate_ranks):
        try:
            check_world(world, backend)
        except ValueError as exc:
            raise UserError(f"--world-size {world} --backend {backend}: {exc}") from None
    shape = args.shape or ("deepseek-v3" if backend == "nccl" else "tiny")
    spec = SHAPES[shape]
    trace = args.trace or DEFAULT_TRACE[shape]
    if trace not in traces.TRACES:
        raise UserError(f"--trace {trace}: unknown; known: {', '.join(traces.TRACES)}")
    for name in ("layers", "plan_steps", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    tokens = args.tokens or (128 if backend == "nccl" else 32)
    if tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {tokens}")
    base = -(-spec.num_experts // world)
    slots = args.slots_per_rank or base + -(-base // 8)
    if slots * world < spec.num_experts:
        raise UserError(f"--slots-per-rank {slots}: {world} ranks x {slots} slots cannot hold {spec.num_experts} experts")
    dtype = args.dtype or ("bf16" if backend == "nccl" else "fp32")
    return {
        "world_size": world, "backend": backend, "shape": shape, "spec": asdict(spec), "layers": args.layers,
        "tokens_per_rank": tokens, "slots_per_rank": slots, "trace": trace, "plan_steps": args.plan_steps,
        "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "dtype": dtype, "compile": not args.no_compile, "seed": args.seed,
    }


def slot_bytes(cfg: dict) -> int:
    """Bytes of routed-expert slot weights one rank holds."""
    spec = cfg["spec"]
    per_expert = 3 * spec["hidden_size"] * spec["moe_intermediate_size"] * torch.finfo(DTYPES[cfg["dtype"]]).bits // 8
    return per_expert * cfg["slots_per_rank"] * cfg["layers"]


def load_trace(cfg: dict) -> torch.Tensor:
    """``[plan_steps + steps, layers, experts]`` token counts shaped like the bench's model."""
    from omni_passes.placement import traces

    spec = cfg["spec"]
    groups = spec["n_group"] if spec["n_group"] > 1 else 1
    trace_spec = traces.get_spec(
        cfg["trace"], num_layers=cfg["layers"], num_experts=spec["num_experts"], top_k=spec["top_k"],
        num_groups=groups, steps=cfg["plan_steps"] + cfg["steps"],
        tokens_per_step=cfg["tokens_per_rank"] * cfg["world_size"], seed=traces.get_spec(cfg["trace"]).seed + cfg["seed"],
    )
    return traces.generate(trace_spec)


def make_placements(cfg: dict, names: list[str], trace: torch.Tensor, placement_dir: str | None) -> dict:
    """name → Placement for the trace's planning window (or read from ``placement_dir``)."""
    from omni_passes.placement.placement import Placement, PlacementError
    from omni_passes.placement.planner import plan

    window = trace[: cfg["plan_steps"]]
    L, E, W, S = cfg["layers"], cfg["spec"]["num_experts"], cfg["world_size"], cfg["slots_per_rank"]
    groups = cfg["spec"]["n_group"]
    found = {}
    for name in names:
        path = Path(placement_dir, f"{name}.json") if placement_dir else None
        if path is not None and path.exists():
            try:
                p = Placement.load(path)
                p.check_fits(L, E, source=str(path))
            except PlacementError as exc:
                raise UserError(str(exc)) from None
            if p.num_ranks != W or p.slots_per_rank != S:
                raise UserError(
                    f"{path}: placement for {p.num_ranks} ranks x {p.slots_per_rank} slots, this run has {W} x {S}"
                    " (pass --world-size/--slots-per-rank to match, or re-plan)"
                )
            found[name] = p
        elif name == "identity":
            found[name] = Placement.identity(L, E, W, slots_per_rank=S)
        elif name == "eplb":
            from omni_passes.placement.eplb_peer import eplb_plan

            try:
                found[name] = eplb_plan(window.sum(0, dtype=torch.int64), W, 1, S, num_groups=groups)
            except ImportError as exc:
                raise UserError(
                    f"placement eplb needs vLLM here ({exc}); plan it where vLLM is installed with "
                    "--plan-only --save-placements DIR and pass --placement-dir DIR, or leave eplb out of --placements"
                ) from None
        else:
            found[name] = plan(window.numpy(), W, 1, S, num_groups=groups)
    return found


# ---- the workers -----------------------------------------------------------------------------
def _routing(cfg: dict, trace: torch.Tensor, rank: int, device: torch.device) -> list[list[tuple]]:
    """Per measured step and layer: (weights float32 [T, K], ids int64 [T, K]) for this rank's
    tokens, ids drawn without replacement from the trace's expert distribution at that step."""
    spec = cfg["spec"]
    T, K = cfg["tokens_per_rank"], spec["top_k"]
    generator = torch.Generator().manual_seed(cfg["seed"] * 1_000 + rank)
    steps = []
    for counts in trace:
        layers = []
        for row in counts.double():
            probs = (row + 0.5) / (row + 0.5).sum()  # +0.5: an expert never seen can still be drawn
            ids = torch.multinomial(probs.expand(T, -1), K, replacement=False, generator=generator)
            weights = torch.rand(T, K, generator=generator, dtype=torch.float64) + 0.1
            weights = weights / weights.sum(-1, keepdim=True) * spec["routed_scaling_factor"]
            layers.append((weights.float().to(device), ids.to(device)))
        steps.append(layers)
    return steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_worker(group, cfg: dict, placements: list[tuple[str, dict]], trace: torch.Tensor) -> dict:
    """One rank: build with the first placement, apply the others in place, time each."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from omni_passes.ep.moe import PHASES, ExpertParallelMoE, PhaseTimer
    from omni_passes.ep.weights import MoELayerWeights
    from omni_passes.placement.placement import Placement

    device, dtype = group.device, DTYPES[cfg["dtype"]]
    spec = MoESpec(**cfg["spec"])
    layers = [MoELayerWeights.seeded(spec, row, cfg["seed"], device=device, dtype=dtype) for row in range(cfg["layers"])]
    (first_name, first), *rest = placements
    start = time.perf_counter()
    ep = ExpertParallelMoE(
        spec, layers, Placement.from_dict(first), group, dtype=dtype,
        compile_backend="inductor" if cfg["compile"] else None, record_load=True,
    )
    _sync(device)
    build_s = time.perf_counter() - start
    routing = _routing(cfg, trace, group.rank, device)
    x = torch.randn(cfg["tokens_per_rank"], spec.hidden_size, generator=torch.Generator().manual_seed(group.rank)).to(device, dtype)

    def step(t: int, timer=None, rows=None) -> torch.Tensor:
        h = x
        for row in range(ep.num_layers):
            stats = {} if rows is not None else None
            h = h + ep.forward_layer(row, F.rms_norm(h, (spec.hidden_size,)), routing=routing[t][row], timer=timer, stats=stats)
            if rows is not None:
                rows.append(stats["recv_rows"])
        return h

    result = {"rank": group.rank, "device": _device_name(device), "build_s": build_s, "placements": {}}
    records = {name: {"step_ms": [], "phase_ms": dict.fromkeys(PHASES, 0.0), "recv_rows": None, "apply_s": [],
                      "slots_rewritten": []} for name, _ in placements}
    # Rounds cycle through the placements (each applied in place over the previous one), so
    # drift in the machine's speed is shared out rather than landing on whichever runs first.
    for round_index in range(cfg["rounds"]):
        for index, (name, placement) in enumerate(placements):
            record = records[name]
            if round_index or index:
                dist.barrier()
                start = time.perf_counter()
                record["slots_rewritten"].append(ep.apply(Placement.from_dict(placement)))
                _sync(device)
                record["apply_s"].append(time.perf_counter() - start)
            for t in range(cfg["warmup"] if round_index == 0 and index == 0 else 1):
                step(t % len(routing))  # the first warm-up compiles
            ep.controller.take_load()
            dist.barrier()
            for t in range(len(routing)):
                _sync(device)
                start = time.perf_counter()
                step(t)
                _sync(device)
                record["step_ms"].append((time.perf_counter() - start) * 1e3)
            # A pass with phase timers (events/syncs of their own, so kept out of step_ms).
            timer, rows = PhaseTimer(device), []
            dist.barrier()
            for t in range(len(routing)):
                step(t, timer=timer, rows=rows)
            for phase in PHASES:
                record["phase_ms"][phase] += timer.totals[phase]
            record["recv_rows"] = rows  # [steps * layers], step-major; the same every round
    for name, record in records.items():
        runs = len(routing) * cfg["rounds"]
        result["placements"][name] = {
            "step_ms": record["step_ms"],
            "phase_ms_per_step": {p: total / runs for p, total in record["phase_ms"].items()},
            "recv_rows": record["recv_rows"],
            "slots_rewritten": record["slots_rewritten"],
            "apply_s": record["apply_s"],
        }
    from torch._dynamo.utils import counters

    result["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ---- aggregation -----------------------------------------------------------------------------
def summarise(cfg: dict, names: list[str], reports: list[dict], predicted: dict) -> dict:
    """Per placement: the slowest rank's step time, per-rank load and time, balance measured."""
    L, steps = cfg["layers"], cfg["steps"]
    out = {}
    for name in names:
        per_rank = [r["placements"][name] for r in sorted(reports, key=lambda r: r["rank"])]
        slowest = [max(ms) for ms in zip(*(p["step_ms"] for p in per_rank))]  # per step, over rounds
        rows = torch.tensor([p["recv_rows"] for p in per_rank], dtype=torch.float64).view(len(per_rank), steps, L)
        load_imbalance = (rows.max(0).values / rows.mean(0).clamp(min=1e-9)).mean().item()
        expert_ms = [p["phase_ms_per_step"]["experts"] for p in per_rank]
        out[name] = {
            "step_ms": {"mean": statistics.fmean(slowest), "p50": statistics.median(slowest), "min": min(slowest)},
            "moe_layer_ms": statistics.fmean(slowest) / L,
            "predicted_imbalance": predicted[name],
            "measured_load_imbalance": load_imbalance,
            "expert_time_imbalance": max(expert_ms) / max(statistics.fmean(expert_ms), 1e-9),
            "slots_rewritten_per_apply": [sum(n) for n in zip(*(p["slots_rewritten"] for p in per_rank))],
            "apply_s_max": max((s for p in per_rank for s in p["apply_s"]), default=0.0),
            "per_rank": [
                {
                    "rank": rank,
                    "rows_per_step": rows[rank].sum(-1).mean().item(),
                    "step_ms_mean": statistics.fmean(p["step_ms"]),
                    **{f"{phase}_ms": ms for phase, ms in p["phase_ms_per_step"].items()},
                }
                for rank, p in enumerate(per_rank)
            ],
        }
    if "identity" in out:
        base = out["identity"]["step_ms"]["mean"]
        for entry in out.values():
            entry["speedup_vs_identity"] = base / entry["step_ms"]["mean"]
    return out


def _predicted(placements: dict, trace: torch.Tensor, cfg: dict) -> dict:
    """Mean over layers of max/mean rank load on the measured steps' summed loads (the planner's metric)."""
    from omni_passes.placement import metrics

    measured = trace[cfg["plan_steps"]:].sum(0, dtype=torch.int64)
    return {name: metrics.score(p, measured).mean_imbalance for name, p in placements.items()}


# ---- output ----------------------------------------------------------------------------------
def print_tables(doc: dict) -> None:
    cfg = doc["config"]
    print(f"expert parallelism: {cfg['world_size']} ranks ({cfg['backend']}, {doc['machine']['device']}), "
          f"{cfg['shape']} x {cfg['layers']} MoE layers, {cfg['tokens_per_rank']} tokens/rank, "
          f"{cfg['slots_per_rank']} slots/rank, trace {cfg['trace']}, {cfg['dtype']}")
    print(f"{'placement':<10} {'pred max/mean':>13} {'load max/mean':>13} {'expert t max/mean':>17} "
          f"{'step ms':>9} {'layer ms':>9} {'vs identity':>11}")
    for name, r in doc["results"].items():
        print(f"{name:<10} {r['predicted_imbalance']:>13.3f} {r['measured_load_imbalance']:>13.3f} "
              f"{r['expert_time_imbalance']:>17.3f} {r['step_ms']['mean']:>9.3f} {r['moe_layer_ms']:>9.3f} "
              f"{r.get('speedup_vs_identity', float('nan')):>10.3f}x")
    print("per rank (rows computed per step, ms per step by phase):")
    for name, r in doc["results"].items():
        for entry in r["per_rank"]:
            print(f"  {name:<10} rank {entry['rank']:<3} rows {entry['rows_per_step']:>9.1f}  experts {entry['experts_ms']:>8.3f}"
                  f"  dispatch {entry['dispatch_ms']:>8.3f}  return {entry['return_ms']:>8.3f}"
                  f"  prepare {entry['prepare_ms']:>7.3f}  combine {entry['combine_ms']:>7.3f}")


def plot(doc: dict, directory: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(directory).mkdir(parents=True, exist_ok=True)
    results = doc["results"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(results), 1)
    for i, (name, r) in enumerate(results.items()):
        ranks = [e["rank"] + i * width for e in r["per_rank"]]
        axes[0].bar(ranks, [e["rows_per_step"] for e in r["per_rank"]], width, label=name)
        axes[1].bar(ranks, [e["experts_ms"] for e in r["per_rank"]], width, label=name)
    axes[0].set(title="rows computed per step", xlabel="rank")
    axes[1].set(title="expert GEMM ms per step", xlabel="rank")
    axes[0].legend()
    fig.suptitle(f"{doc['config']['shape']} x {doc['config']['layers']} layers on {doc['config']['world_size']} ranks")
    path = str(Path(directory, "ep_per_rank.png"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _run(args: argparse.Namespace) -> int:
    from omni_passes.ep.launch import run_workers

    cfg = resolve(args)
    names = list(dict.fromkeys(args.placements))
    trace = load_trace(cfg)
    placements = make_placements(cfg, names, trace, args.placement_dir)
    if args.save_placements:
        Path(args.save_placements).mkdir(parents=True, exist_ok=True)
        for name, p in placements.items():
            p.save(Path(args.save_placements, f"{name}.json"))
        say(f"wrote {', '.join(f'{n}.json' for n in placements)} to {args.save_placements}")
    predicted = _predicted(placements, trace, cfg)
    doc = {"config": cfg, "machine": {"host": platform.node(), "torch": torch.__version__}}
    if args.plan_only:
        doc["predicted_imbalance"] = predicted
        if args.json:
            emit_json(doc)
        else:
            for name, value in predicted.items():
                print(f"{name:<10} predicted max/mean rank load {value:.3f}")
        return 0
    if args.emulate_ranks:
        return _emulate(args, cfg, names, placements, trace, predicted, doc)
    if cfg["backend"] == "nccl":
        need = slot_bytes(cfg)
        have = torch.cuda.get_device_properties(0).total_memory
        if need > 0.8 * have:
            raise UserError(
                f"{cfg['layers']} layers x {cfg['slots_per_rank']} slots of {cfg['shape']} experts need "
                f"{need / 2**30:.1f} GiB per GPU ({have / 2**30:.0f} GiB there): lower --layers or --slots-per-rank"
            )
    say(f"bench ep: {cfg['world_size']} x {cfg['backend']} ranks, {cfg['shape']}, placements {', '.join(names)}")
    start = time.perf_counter()
    reports = run_workers(
        bench_worker, cfg["world_size"], cfg["backend"],
        (cfg, [(n, placements[n].to_dict()) for n in names], trace[cfg["plan_steps"]:]),
    )
    doc["machine"]["device"] = reports[0]["device"]
    doc["wall_s"] = time.perf_counter() - start
    doc["step_definition"] = "MoE-layer stack as decode-step proxy: h = h + moe_l(rms_norm(h)) for each layer; no attention"
    doc["results"] = summarise(cfg, names, reports, predicted)
    doc["build_s_max"] = max(r["build_s"] for r in reports)
    doc["compiled_graphs_per_rank"] = [r["compiled_graphs"] for r in reports]
    if args.plot:
        doc["plots"] = plot(doc, args.plot)
    if args.json:
        emit_json(doc)
    else:
        print_tables(doc)
    return 0


def _emulate(args, cfg: dict, names: list[str], placements: dict, trace: torch.Tensor, predicted: dict, doc: dict) -> int:
    """``--emulate-ranks``: per-rank expert compute of a ``world_size``-rank run, on this one device."""
    from omni_passes.ep.emulate import summarise_ranks, time_ranks
    from omni_passes.ep.weights import MoELayerWeights

    device = torch.device("cuda", 0) if cfg["backend"] == "nccl" else torch.device("cpu")
    dtype = DTYPES[cfg["dtype"]]
    spec = MoESpec(**cfg["spec"])
    measured = trace[cfg["plan_steps"]:]
    routing = [[[ids for _, ids in layer] for layer in _routing(cfg, measured, rank, device)] for rank in range(cfg["world_size"])]
    layers = [MoELayerWeights.seeded(spec, row, cfg["seed"], device=device, dtype=dtype) for row in range(cfg["layers"])]
    results = {}
    start = time.perf_counter()
    for name in names:
        say(f"emulating {cfg['world_size']} ranks of {name}")
        timing = time_ranks(spec, placements[name], layers, routing, device, dtype,
                            compile_backend=None if args.no_compile else "inductor")
        results[name] = {"predicted_imbalance": predicted[name], **summarise_ranks(timing, spec.hidden_size, dtype.itemsize)}
    if "identity" in results:
        base = results["identity"]["step_expert_ms_slowest_rank"]
        for entry in results.values():
            entry["speedup_vs_identity"] = base / entry["step_expert_ms_slowest_rank"]
    doc["mode"] = "emulated ranks: each rank's expert GEMM timed in turn on one device; no all-to-all"
    doc["machine"]["device"] = _device_name(device)
    doc["wall_s"] = time.perf_counter() - start
    doc["results"] = results
    if args.json:
        emit_json(doc)
        return 0
    print(f"{cfg['world_size']} ranks emulated on {doc['machine']['device']}: {cfg['shape']} x {cfg['layers']} MoE layers, "
          f"{cfg['tokens_per_rank']} tokens/rank, {cfg['slots_per_rank']} slots/rank, trace {cfg['trace']}, {cfg['dtype']}")
    print(f"{'placement':<10} {'pred max/mean':>13} {'load max/mean':>13} {'time max/mean':>13} "
          f"{'step expert ms (slowest rank per layer)':>40} {'vs identity':>11}")
    for name, r in results.items():
        print(f"{name:<10} {r['predicted_imbalance']:>13.3f} {r['rank_load_imbalance']:>13.3f} "
              f"{r['expert_time_imbalance']:>13.3f} {r['step_expert_ms_slowest_rank']:>40.3f} "
              f"{r.get('speedup_vs_identity', float('nan')):>10.3f}x")
    for name, r in results.items():
        for e in r["per_rank"]:
            print(f"  {name:<10} rank {e['rank']:<3} rows {e['rows_per_step']:>9.1f}  active slots/layer "
                  f"{e['active_slots_per_layer']:>6.1f}  expert ms {e['expert_ms_per_step']:>8.3f}  "
                  f"receives {e['receive_mb_per_step']:>7.2f} MB/step")
    return 0
