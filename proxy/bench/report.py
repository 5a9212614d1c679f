"""The comparison table printed by ``omni-proxy bench`` (JSON is the machine-readable form)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _s(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def points_of(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Every measured point of a router entry: its sweep, or the entry itself (one rate)."""
    if entry.get("sweep"):
        return list(entry["sweep"])
    return [entry] if "ttft" in entry else []


def common_load(entries: dict[str, dict[str, Any]], attainment: float = 0.9) -> float | None:
    """The highest offered rate that every router with a passing point ran and passed: the
    load at which latencies are compared (all within the SLO there). Routers that passed no
    rate do not constrain it; None if there is no such rate."""
    passed = []
    for entry in entries.values():
        rates = {p["offered_rate"] for p in points_of(entry) if p.get("slo_attainment", 0.0) >= attainment}
        if rates:
            passed.append(rates)
    shared = set.intersection(*passed) if passed else set()
    return max(shared) if shared else None


def latency_at(entries: dict[str, dict[str, Any]], rate: float) -> dict[str, dict[str, float | None]]:
    """TTFT and TPOT p50/p90 of every router at ``rate`` (routers that did not run it left out)."""
    out = {}
    for name, entry in entries.items():
        point = next((p for p in points_of(entry) if p.get("offered_rate") == rate), None)
        if point is not None:
            out[name] = {"ttft_p50": point["ttft"]["p50"], "ttft_p90": point["ttft"]["p90"],
                         "tpot_p50": point["tpot"]["p50"], "tpot_p90": point["tpot"]["p90"],
                         "slo_attainment": point["slo_attainment"]}
    return out


def prefix_hit_share(entry: dict[str, Any]) -> float | None:
    """Share of prompt tokens served from the prefix cache where prompts are computed:
    collocated instances, else prefill ones (decode instances receive the KV and count its
    prompt as uncached, so pooling them in would halve the share)."""
    roles = (entry.get("simulator") or {}).get("roles") or {}
    for role in ("collocated", "prefill"):
        if role in roles:
            return roles[role].get("prefix_hit_share")
    return None


def _hit(entry: dict[str, Any]) -> str:
    return _pct(prefix_hit_share(entry))


def _cpu(entry: dict[str, Any], name: str) -> str:
    c = (entry.get("cpu") or {}).get(name)
    return "-" if not c else f"{c['mean']:.0f}/{c['peak']:.0f}"


def table(entries: dict[str, dict[str, Any]]) -> str:
    """One row per router: rate or goodput, counts, TTFT/TPOT/ITL/E2E, SLO share, CPU."""
    header = ["router", "mode", "rate", "QPM@SLO", "done/fail", "TTFT p50/p90/p99 s", "TPOT p50/p90/p99 ms",
              "ITL p50/p99 ms", "E2E p50/p99 s", "SLO met", "cache hit", "CPU% rtr/sim/cli/other", "lag p99 ms sim/cli"]
    rows = [header]
    for name, e in entries.items():
        if "ttft" not in e:
            rows.append([name, e.get("mode", "-"), "-", "-", "-", e.get("skipped") and "skipped: " + e["skipped"][:60]
                         or "error: " + str(e.get("error"))[:60]] + [""] * (len(header) - 6))
            continue
        t, p, i, x = e["ttft"], e["tpot"], e["itl"], e["e2e"]
        lag = ((e.get("simulator") or {}).get("loop_lag") or {}).get("p99")
        rows.append([
            name, e["mode"], _s(e.get("offered_rate"), 2),
            "-" if e.get("goodput_qpm") is None else f"{e['goodput_qpm']:.0f}",
            f"{e['completed']}/{e['failed']}",
            f"{_s(t['p50'])}/{_s(t['p90'])}/{_s(t['p99'])}",
            f"{_ms(p['p50'])}/{_ms(p['p90'])}/{_ms(p['p99'])}",
            f"{_ms(i['p50'])}/{_ms(i['p99'])}",
            f"{_s(x['p50'], 2)}/{_s(x['p99'], 2)}",
            _pct(e.get("slo_attainment")), _hit(e),
            "/".join(_cpu(e, n).split("/")[0] for n in ("router", "simulator", "client", "others")),
            f"{_ms(lag)}/{_ms((e.get('send_lag') or {}).get('p99'))}",
        ])
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def overhead_table(entries: dict[str, dict[str, Any]]) -> str | None:
    rows = [(n, e["added_latency"]) for n, e in entries.items() if "added_latency" in e]
    if not rows:
        return None
    out = ["added latency vs direct (ms)   TTFT p50   TTFT p99   E2E p50   E2E p99"]
    for name, a in rows:
        out.append(f"{name:<30} {_ms(a['ttft']['p50']):>9}  {_ms(a['ttft']['p99']):>9}  "
                   f"{_ms(a['e2e']['p50']):>8}  {_ms(a['e2e']['p99']):>8}")
    return "\n".join(out)


def sweep_table(entries: dict[str, dict[str, Any]]) -> str | None:
    """Attainment per router and rate (sweeps only)."""
    sweeps = {n: e["sweep"] for n, e in entries.items() if e.get("sweep")}
    if not sweeps:
        return None
    rates = sorted({p["offered_rate"] for s in sweeps.values() for p in s})
    head = ["SLO met at rate (req/s)"] + [f"{r:g}" for r in rates]
    rows = [head]
    for name, points in sweeps.items():
        by_rate = {p["offered_rate"]: p["slo_attainment"] for p in points}
        rows.append([name] + [_pct(by_rate.get(r)) if r in by_rate else "" for r in rates])
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths))) for r in rows)


def render(entries: dict[str, dict[str, Any]], header_lines: Sequence[str] = ()) -> str:
    parts = list(header_lines) + [table(entries)]
    for extra in (sweep_table(entries), overhead_table(entries)):
        if extra:
            parts += ["", extra]
    return "\n".join(parts)
