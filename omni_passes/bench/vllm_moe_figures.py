"""The figures of `omni-passes bench vllm --device cuda` from what its engines measured: HBM floors of
the decode step, balancedness over emulated ranks, ratios to passes off and the issue's goals.
Pure functions of plain numbers (tested on CPU: tests/unit/test_bench_vllm_moe_cuda.py).

Decode-step floor: the bytes one step must read, over the device copy bandwidth measured in the
same engine. Weights: everything but the routed experts (read every step) plus one row per
expert replica the batch touches; KV: every request's context in every layer. The rows touched
follow the occurrence rule of the dispatch: in one step, expert e with c replicas and n tokens
reads replicas 0..min(n, c)-1, so replica j is read iff n > j, with n ~ Binomial(B, K p_e) for
a batch of B tokens and the expert's measured share p_e of the K choices per token. With one
replica per expert this is the familiar sum_e 1 - (1 - K p_e)^B; redundant replicas of hot
experts add the rows a busy step spreads onto.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from omni_passes.bench import vllm_common

GOALS = {"identity_ratio": 0.99, "redundant_cost_b64": 0.03, "balancedness_after": 0.95, "warm_start_ratio": 1.10}


def rows_touched(expert_load: torch.Tensor, replicas: torch.Tensor, batch: int, top_k: int) -> float:
    """Expected storage rows one MoE layer reads in a step of ``batch`` tokens (module docstring).

    Args: expert_load ``[E]`` measured tokens per logical expert (any scale); replicas ``[E]``
    replicas per expert (>= 1). Returns a float in [0, sum(replicas)].
    """
    load = expert_load.double()
    share = (top_k * load / load.sum().clamp_min(1e-30)).clamp(0.0, 1.0)  # P(a token picks e)
    total = 0.0
    for p, count in zip(share.tolist(), replicas.tolist()):
        below = 0.0  # P(n <= j), accumulated over j
        for j in range(int(count)):
            below += math.comb(batch, j) * p**j * (1 - p) ** (batch - j) if j <= batch else 0.0
            total += max(0.0, 1.0 - below)
    return total


def decode_floor_bytes(weights: dict, expert_loads: torch.Tensor, replicas: torch.Tensor, batch: int, context: int,
                       kv_token_bytes: int, top_k: int) -> dict:
    """Bytes one decode step of ``batch`` requests at ``context`` tokens must read.

    Args: weights ``count_weights``' dict (``dense_bytes``, ``expert_row_bytes``);
    expert_loads / replicas ``[L, E]`` per MoE layer; kv_token_bytes: KV bytes of one token in
    all layers. Returns ``{"weights", "experts", "kv", "total", "rows"}`` (bytes; rows read).
    """
    rows = sum(rows_touched(expert_loads[layer], replicas[layer], batch, top_k) for layer in range(expert_loads.shape[0]))
    experts = rows * weights["expert_row_bytes"]
    kv = batch * context * kv_token_bytes
    return {"weights": int(weights["dense_bytes"] + experts), "experts": int(experts), "kv": int(kv),
            "total": int(weights["dense_bytes"] + experts + kv), "rows": rows}


def replicas_of(phy2log: list[list[int]], experts: int) -> torch.Tensor:
    """``[L, E]`` replicas per expert of a placement's ``phy2log``."""
    table = torch.as_tensor(phy2log, dtype=torch.int64)
    return torch.zeros(table.shape[0], experts, dtype=torch.int64).scatter_add_(1, table, torch.ones_like(table))


def rank_balancedness(slot_load: Any, slots_per_rank: int) -> float:
    """Mean over MoE layers of mean/max rank load, slot j on rank j // slots_per_rank (1 for an
    idle layer)."""
    from omni_passes.placement import metrics

    loads = torch.as_tensor(slot_load, dtype=torch.float64)
    ranks = loads.view(loads.shape[0], -1, slots_per_rank).sum(-1)
    return float(metrics.balancedness(ranks).mean())


def load_imbalance(expert_load: Any) -> dict:
    """How uneven the logical loads are: max/mean and min/mean per layer, averaged, and the share
    of the hottest eighth of the experts."""
    loads = torch.as_tensor(expert_load, dtype=torch.float64)
    mean = loads.mean(1, keepdim=True).clamp_min(1e-30)
    top = loads.sort(1, descending=True).values[:, : max(1, loads.shape[1] // 8)].sum(1) / loads.sum(1).clamp_min(1e-30)
    return {"max_over_mean": float((loads.max(1).values / mean[:, 0]).mean()),
            "min_over_mean": float((loads.min(1).values / mean[:, 0]).mean()),
            "top_eighth_share": float(top.mean())}


# --------------------------------------------------------------------------- per engine
def batch_figures(rounds: list[dict]) -> dict[int, dict]:
    """Medians per batch over an engine's rounds: output tokens/s, TPOT, context."""
    found: dict[int, dict] = {}
    for batch in sorted({r["batch"] for r in rounds}):
        mine = [r for r in rounds if r["batch"] == batch and not r.get("gave_up")]
        tpots = [r["tpot_s"] for r in mine if r.get("tpot_s")]
        found[batch] = {"rounds": len(mine),
                        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine) if mine else None,
                        "tpot_s": statistics.median(tpots) if tpots else None,
                        "tpot_all_s": tpots, "tokens_per_s_all": [r["tokens_per_s"] for r in mine],
                        "context": mine[0]["context"] if mine else None}
    return found


def summarize(result: dict) -> dict:
    """Figures per engine and batch (with floors), ratios to passes off, balancedness, start-up
    times and the goals, from whatever the engines measured."""
    engines = result["engines"]
    config = result["model_config"]
    top_k, experts = config["num_experts_per_tok"], config["n_routed_experts"]
    kv_token_bytes = config["num_hidden_layers"] * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * 2
    # Routing is the same in every engine (same skew, same prompts): the identity engine's loads
    # stand for passes off too.
    reference_loads = _loads(engines.get("identity")) or _loads(engines.get("identity_warm"))
    summary: dict[str, Any] = {"engines": {}, "goals": []}
    for name, engine in engines.items():
        if not engine.get("rounds"):
            continue
        figures = batch_figures(engine["rounds"])
        loads = _loads(engine) or reference_loads
        replicas = (replicas_of(engine["placement"]["phy2log"], experts) if engine.get("placement")
                    else torch.ones(len(loads), experts, dtype=torch.int64) if loads else None)
        ready = engine.get("ready", {})
        if loads and "weights" in ready and "copy_bandwidth" in ready:
            bandwidth = ready["copy_bandwidth"]["bytes_per_s"]
            for batch, fig in figures.items():
                if fig["context"] is None:
                    continue
                floor = decode_floor_bytes(ready["weights"], torch.as_tensor(loads), replicas, batch, fig["context"],
                                           kv_token_bytes, top_k)
                fig["floor_bytes"], fig["floor_s"] = floor, floor["total"] / bandwidth
                fig["of_floor"] = fig["floor_s"] / fig["tpot_s"] if fig["tpot_s"] else None
        summary["engines"][name] = {"batches": figures, "startup_s": ready.get("startup_s"),
                                    "same_tokens_as_off": same_tokens(engine["rounds"], engines)}
        if loads:
            summary["engines"][name]["load_imbalance"] = load_imbalance(loads)
    _ratios(summary)
    _balance(summary, result)
    _goals(summary, result)
    return summary


def same_tokens(rounds: list[dict], engines: dict) -> dict:
    """Rounds whose greedy tokens equal passes off's for the same workload (batch and seed), out
    of those passes off also ran."""
    off = {(r["batch"], r.get("seed")): r.get("tokens_sha1") for n, e in engines.items() if n.startswith("off")
           for r in e.get("rounds", []) if not r.get("gave_up")}
    compared = [r for r in rounds if (r["batch"], r.get("seed")) in off and not r.get("gave_up")]
    equal = sum(r.get("tokens_sha1") == off[(r["batch"], r.get("seed"))] for r in compared)
    return {"equal": equal, "compared": len(compared)}


def _loads(engine: dict | None) -> list | None:
    status = (engine or {}).get("status")
    return status["total_expert_load"] if status else None


def _ratios(summary: dict) -> None:
    """Each engine against passes off (the rounds of every off engine pooled: cold and warm)."""
    offs = [e for n, e in summary["engines"].items() if n.startswith("off")]
    if not offs:
        return
    for name, engine in summary["engines"].items():
        if name.startswith("off"):
            continue
        for batch, fig in engine["batches"].items():
            base_tps = [v for off in offs for v in off["batches"].get(batch, {}).get("tokens_per_s_all", [])]
            base_tpot = [v for off in offs for v in off["batches"].get(batch, {}).get("tpot_all_s", [])]
            if base_tps and fig["tokens_per_s"]:
                fig["tokens_per_s_vs_off"] = fig["tokens_per_s"] / statistics.median(base_tps)
            if base_tpot and fig["tpot_s"]:
                fig["tpot_vs_off"] = fig["tpot_s"] / statistics.median(base_tpot)  # > 1: slower than off
                floors = [off["batches"].get(batch, {}).get("floor_s") for off in offs]
                floors = [f for f in floors if f]
                if floors and fig.get("floor_s"):
                    fig["floor_vs_off"] = fig["floor_s"] / statistics.median(floors)


def _balance(summary: dict, result: dict) -> None:
    slots_per_rank = result.get("slots_per_rank", {})
    found: dict[str, Any] = {}
    for name in ("identity", "redundant"):
        engine = result["engines"].get(name, {})
        if engine.get("status") and name in slots_per_rank:
            found[name] = rank_balancedness(engine["status"]["total_slot_load"], slots_per_rank[name])
    rebalance = result["engines"].get("rebalance", {}).get("balance")
    if rebalance:
        found["rebalance_rounds"] = [r["balancedness"] for r in rebalance["rounds"]]
        found["rebalance_before"] = rebalance["rounds"][0]["balancedness"]
        found["rebalance_after"] = rebalance["rounds"][-1]["balancedness"]
        found["rebalances_applied"] = sum(e["applied"] for e in rebalance.get("events", []))
    summary["balancedness"] = found


def _goals(summary: dict, result: dict) -> None:
    goals = summary["goals"]
    engines = summary["engines"]

    def goal(what: str, value: float | None, op: str, target: float, why: str) -> None:
        goals.append(vllm_common.goal(what, value, op, target, why))

    identity = engines.get("identity", {}).get("batches", {})
    for batch, fig in sorted(identity.items()):
        tps = fig.get("tokens_per_s_vs_off")
        tpot = fig.get("tpot_vs_off")
        goal(f"identity output tokens/s at batch {batch} / passes off", tps, ">=", GOALS["identity_ratio"],
             "the omni op's extra work per MoE layer and step (one dispatch-and-count kernel, the op's Python in eager "
             "steps) against a step of "
             f"{fig['tpot_s'] * 1e3:.2f} ms" if fig.get("tpot_s") else "no TPOT measured")
        goal(f"identity decode speed at batch {batch} (passes-off TPOT / identity TPOT)",
             1 / tpot if tpot else None, ">=", GOALS["identity_ratio"],
             "see the dispatch check's microseconds per layer call (26 MoE layers per step)")
    red = engines.get("redundant", {}).get("batches", {}).get(64)
    if red and red.get("tpot_vs_off"):
        extra = red.get("floor_vs_off")
        goal("redundant (8 slots per layer) TPOT cost at batch 64", red["tpot_vs_off"] - 1, "<=",
             GOALS["redundant_cost_b64"],
             f"the floor grows by {((extra or 1) - 1) * 100:.1f}% from the replica rows a step reads "
             f"({red['floor_bytes']['rows']:.0f} rows vs the identity's)" if extra else "no floor measured")
    balance = summary.get("balancedness", {})
    goal("balancedness over 8 emulated ranks after online rebalancing", balance.get("rebalance_after"), ">=",
         GOALS["balancedness_after"],
         f"{balance.get('rebalances_applied', 0)} rebalances applied; the window and the move budget limit how far "
         "one run gets" if balance else "no rebalancing run")
    cold = {n: e.get("startup_s") for n, e in engines.items()}
    if cold.get("off_warm") and cold.get("identity_warm"):
        goal("warm start, passes on / passes off", cold["identity_warm"] / cold["off_warm"], "<=",
             GOALS["warm_start_ratio"], "the runtime is built at the first op call of the warm start (rows, tables, "
             "the serving loop) inside vLLM's profile run")
