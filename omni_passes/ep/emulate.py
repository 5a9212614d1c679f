"""Each rank's expert compute of an N-rank run, measured one rank at a time on one device.

Where only one GPU is at hand, this measures the part of an N-rank step that placement changes
most directly: the grouped GEMM each rank runs on the rows it receives. For every measured step
and MoE layer, the rows every source rank would send to rank r are worked out exactly as in a
real run (the same per-rank routing, each source's own dispatch tables with its local
preference, ``omni::expert_dispatch``), and rank r's compiled expert region (the one
``ExpertParallelMoE`` runs) is timed on them with rank r's slot weights. Ranks are run in turn,
so one rank's slots are in memory at a time.

What it leaves out: the all-to-all (its bytes per rank are reported, not timed), the prepare and
combine regions (the same work on every rank whatever the placement) and any interference
between ranks. An N-rank step waits at every layer for the slowest rank, so the step's expert
time is ``sum over layers of max over ranks``.
"""

from __future__ import annotations

import statistics
import time

import torch

from kernels.expert_dispatch import expert_dispatch_reference
from omni_passes.ep.comm import padded_rows
from omni_passes.ep.moe import _experts
from omni_passes.ep.weights import MoELayerWeights, MoESpec
from omni_passes.placement.placement import Placement
from omni_passes.placement.tables import dispatch_tables


def source_tables(placement: Placement, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each source rank's dispatch tables (with its local preference), as its run would hold them."""
    return [
        tuple(t.to(device) for t in dispatch_tables(placement, local_rank=source))
        for source in range(placement.num_ranks)
    ]


def rows_per_rank(
    placement: Placement, row: int, ids_per_source: list[torch.Tensor], tables: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    """Local slot ids of the rows each rank receives in MoE layer ``row``.

    Args:
        ids_per_source: per source rank, its tokens' logical ids ``[T, K]``.
        tables: ``source_tables(placement, device)``.

    Returns:
        per destination rank, int64 ``[rows]`` local slot ids (sources concatenated).
    """
    S, W = placement.slots_per_rank, placement.num_ranks
    received: list[list[torch.Tensor]] = [[] for _ in range(W)]
    for source, ids in enumerate(ids_per_source):
        slots = expert_dispatch_reference(ids, *tables[source], row).reshape(-1)
        rank = slots // S
        for dest in range(W):
            received[dest].append(slots[rank == dest] - dest * S)
    return [torch.cat(parts) for parts in received]


def time_ranks(
    spec: MoESpec,
    placement: Placement,
    layers: list[MoELayerWeights],
    routing: list[list[list[torch.Tensor]]],
    device: torch.device,
    dtype: torch.dtype,
    compile_backend: str | None = "inductor",
    warmup: int = 2,
) -> dict:
    """Per-rank expert GEMM time and load of an N-rank run of ``placement``.

    Args:
        routing: ``routing[source][step][row]`` logical ids ``[T, K]`` of each source rank's tokens.

    Returns:
        ``{"rank_ms": [W][steps] per-step expert ms, "layer_ms": [W][steps][L],
        "rows": [W][steps][L], "active_slots": [W][steps][L]}``.
    """
    W, S, L = placement.num_ranks, placement.slots_per_rank, placement.num_layers
    steps = len(routing[0])
    H, I = spec.hidden_size, spec.moe_intermediate_size
    experts_fn = torch.compile(_experts, fullgraph=True, backend=compile_backend) if compile_backend else _experts
    tables = source_tables(placement, device)
    plan = [
        [rows_per_rank(placement, row, [routing[s][t][row] for s in range(W)], tables) for row in range(L)]
        for t in range(steps)
    ]
    timed = device.type == "cuda"
    result = {"rank_ms": [], "layer_ms": [], "rows": [], "active_slots": []}
    generator = torch.Generator().manual_seed(0)
    for rank in range(W):
        gate_up = torch.empty(L, S, 2 * I, H, device=device, dtype=dtype)
        down = torch.empty(L, S, H, I, device=device, dtype=dtype)
        for row, weights in enumerate(layers):
            local = placement.phy2log[row, rank * S : (rank + 1) * S]
            weights.experts.fill(local, gate_up[row], down[row])
        inputs = []
        for t in range(steps):
            per_layer = []
            for row in range(L):
                slot = plan[t][row][rank]
                n, padded = slot.numel(), padded_rows(slot.numel())
                slot_padded = torch.full((padded,), S, dtype=torch.int64, device=device)
                slot_padded[:n] = slot
                x = torch.zeros(padded, H, dtype=dtype, device=device)
                x[:n] = torch.randn(n, H, generator=generator).to(device, dtype)
                if compile_backend:
                    torch._dynamo.mark_dynamic(x, 0)
                    torch._dynamo.mark_dynamic(slot_padded, 0)
                per_layer.append((x, slot_padded))
            inputs.append(per_layer)
        for t in range(min(warmup, steps)):
            for row in range(L):
                experts_fn(*inputs[t][row], gate_up[row], down[row])
        layer_ms, step_ms = [], []
        for t in range(steps):
            times = []
            for row in range(L):
                if timed:
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    experts_fn(*inputs[t][row], gate_up[row], down[row])
                    stop.record()
                    stop.synchronize()
                    times.append(start.elapsed_time(stop))
                else:
                    begin = time.perf_counter()
                    experts_fn(*inputs[t][row], gate_up[row], down[row])
                    times.append((time.perf_counter() - begin) * 1e3)
            layer_ms.append(times)
            step_ms.append(sum(times))
        result["rank_ms"].append(step_ms)
        result["layer_ms"].append(layer_ms)
        result["rows"].append([[plan[t][row][rank].numel() for row in range(L)] for t in range(steps)])
        result["active_slots"].append([[int(plan[t][row][rank].unique().numel()) for row in range(L)] for t in range(steps)])
        del gate_up, down, inputs
        if timed:
            torch.cuda.empty_cache()
    return result


def summarise_ranks(result: dict, hidden_size: int, bytes_per_value: int) -> dict:
    """Step expert time the way N ranks would see it, and per-rank load and time."""
    layer_ms = torch.tensor(result["layer_ms"], dtype=torch.float64)  # [W, steps, L]
    rows = torch.tensor(result["rows"], dtype=torch.float64)
    W = layer_ms.shape[0]
    slowest = layer_ms.max(0).values.sum(-1)  # per step: each layer waits for its slowest rank
    return {
        "step_expert_ms_slowest_rank": statistics.fmean(slowest.tolist()),
        "rank_load_imbalance": (rows.max(0).values / rows.mean(0).clamp(min=1e-9)).mean().item(),
        "expert_time_imbalance": (layer_ms.max(0).values / layer_ms.mean(0).clamp(min=1e-9)).mean().item(),
        "per_rank": [
            {
                "rank": r,
                "rows_per_step": rows[r].sum(-1).mean().item(),
                "active_slots_per_layer": statistics.fmean(v for step in result["active_slots"][r] for v in step),
                "expert_ms_per_step": layer_ms[r].sum(-1).mean().item(),
                "receive_mb_per_step": rows[r].sum(-1).mean().item() * hidden_size * bytes_per_value / 1e6,
            }
            for r in range(W)
        ],
    }
