"""PNG figures of a bench run (matplotlib, Agg backend).

* ``ttft_cdf.png`` / ``tpot_cdf.png``: per-request CDFs, one line per router, at one offered
  rate that every router ran (the highest such rate), with the SLO as a vertical line;
* ``goodput_vs_rate.png`` (sweeps): SLO attainment, and SLO-meeting requests per second of the
  point's wall time from first send to last end (the drain of long answers included)
  against offered rate, one line per router.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .metrics import SLO


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def common_rate(outcomes: Sequence) -> float | None:
    """The highest offered rate every router with results ran at."""
    sets = [{p.summary["offered_rate"] for p in o.points} for o in outcomes if o.points]
    if not sets:
        return None
    shared = set.intersection(*sets)
    return max(shared) if shared else None


def write_plots(outcomes: Sequence, slo: SLO, out_dir: str | Path, title: str = "") -> list[str]:
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    rate = common_rate(outcomes)
    for metric, limit, unit in (("ttft", slo.ttft, "s"), ("tpot", slo.tpot, "s")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for o in outcomes:
            point = next((p for p in o.points if p.summary["offered_rate"] == rate), None)
            if point is None:
                continue
            values = sorted(v for r in point.records if r.ok for v in [getattr(r, metric)] if v is not None)
            if not values:
                continue
            ys = [(k + 1) / len(values) for k in range(len(values))]
            ax.step(values, ys, where="post", label=o.spec.name)
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
    swept = [o for o in outcomes if len(o.points) > 1 or "sweep" in o.entry]
    if swept:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
        for o in swept:
            rates = [p.summary["offered_rate"] for p in o.points]
            ax1.plot(rates, [p.summary["slo_attainment"] for p in o.points], marker="o", label=o.spec.name)
            ax2.plot(rates, [p.summary["slo_met"] / max(p.summary["duration_s"], 1e-9) for p in o.points],
                     marker="o", label=o.spec.name)
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
