"""PNG figures of a bench run (matplotlib, Agg backend), drawn from its JSON entries alone.

* ``ttft_cdf.png`` / ``tpot_cdf.png``: per-request CDFs (the points' stored quantiles), one line
  per router, at the common load (``report.common_load``: the highest rate every router passed),
  with the SLO as a vertical line;
* ``ttft_vs_rate.png`` (sweeps): TTFT p50 (solid) and p90 (dashed) against offered rate;
* ``goodput_vs_rate.png`` (sweeps): SLO attainment, and SLO-meeting requests per second of the
  point's wall time from first send to last end (the drain of long answers included)
  against offered rate, one line per router.

``python -m proxy.bench.plots RESULT.json OUT_DIR`` redraws them from a saved result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .metrics import SLO
from .report import common_load, points_of


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(entries: dict[str, dict[str, Any]], slo: SLO, out_dir: str | Path, title: str = "") -> list[str]:
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    rate = common_load(entries, slo.attainment)
    for metric, limit, unit in (("ttft", slo.ttft, "s"), ("tpot", slo.tpot, "s")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, entry in entries.items():
            point = next((p for p in points_of(entry) if p.get("offered_rate") == rate), None)
            values = ((point or {}).get("cdf") or {}).get(metric)
            if not values:
                continue
            ax.plot(values, [k / (len(values) - 1) for k in range(len(values))], label=name)
        ax.axvline(limit, color="grey", linestyle="--", linewidth=1, label=f"SLO {limit:g} {unit}")
        ax.set_xlabel(f"{metric.upper()} ({unit})")
        ax.set_ylabel("share of completed requests")
        ax.set_title(f"{metric.upper()} CDF at {rate:g} req/s {title}".strip() if rate is not None else metric.upper())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        path = out / f"{metric}_cdf.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(str(path))
    swept = {n: e["sweep"] for n, e in entries.items() if e.get("sweep")}
    if swept:
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for k, (name, points) in enumerate(swept.items()):
            rates = [p["offered_rate"] for p in points]
            color = f"C{k % 10}"
            ax.plot(rates, [p["ttft"]["p50"] for p in points], marker="o", color=color, label=f"{name} p50")
            ax.plot(rates, [p["ttft"]["p90"] for p in points], marker=".", linestyle="--", color=color,
                    label=f"{name} p90")
        ax.axhline(slo.ttft, color="grey", linestyle=":", linewidth=1, label=f"SLO {slo.ttft:g} s")
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel("TTFT (s)")
        ax.set_title(f"TTFT vs rate {title}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        path = out / "ttft_vs_rate.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(str(path))

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
        for name, points in swept.items():
            rates = [p["offered_rate"] for p in points]
            ax1.plot(rates, [p["slo_attainment"] for p in points], marker="o", label=name)
            ax2.plot(rates, [p["slo_met"] / max(p["duration_s"], 1e-9) for p in points], marker="o", label=name)
        ax1.axhline(slo.attainment, color="grey", linestyle="--", linewidth=1)
        ax1.set_xlabel("offered rate (req/s)")
        ax1.set_ylabel("share meeting TTFT and TPOT SLO")
        ax2.set_xlabel("offered rate (req/s)")
        ax2.set_ylabel("SLO-meeting requests / s (first send to last end)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.suptitle(f"goodput vs rate {title}".strip())
        path = out / "goodput_vs_rate.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(str(path))
    return written


def plot_document(doc: dict[str, Any], out_dir: str | Path) -> list[str]:
    """Figures of a whole ``omni-proxy bench --json`` document."""
    s = doc["slo"]
    title = f"({doc['workload']['name']}, {doc['cluster']['label']})"
    return write_plots(doc["routers"], SLO(s["ttft"], s["tpot"], s["attainment"]), out_dir, title)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m proxy.bench.plots RESULT.json OUT_DIR")
    for written_path in plot_document(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]):
        print(written_path)
