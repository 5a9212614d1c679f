"""What a graph bench run reports: Amdahl bounds of the sparse variants, the table, the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def amdahl(variants: dict[str, dict], base_name: str, contexts: list[int], short: int, fraction: float,
           kinds: tuple[str, ...], key: str) -> None:
    """Amdahl bound of compressing ``fraction`` of the layers over ``base_name``'s step:
    attention share f = (step(C) - step(C0)) / step(C), bound 1 / (1 - f * fraction). The
    measured speedup is 1 / (the variant's per-round ratio to that base, median). Writes
    ``variants[compiled+<kind>@C][key]``."""
    base = variants[base_name]["decode_step_us_by_context"]
    for context in contexts:
        step_c, step_0 = base.get(str(context)), base.get(str(short))
        if step_c is None or step_0 is None:
            continue
        share = max(0.0, (step_c - step_0) / step_c)
        bound = 1.0 / (1.0 - share * fraction)
        for kind in kinds:
            entry = variants.get(f"compiled+{kind}@{context}")
            ratio = (entry or {}).get("ratios", {}).get(base_name, {}).get(f"decode@{context}")
            if ratio is None:
                continue
            gain = 1.0 / ratio["median"]
            entry[key] = {"attention_share": share, "compressed_fraction": fraction, "bound_speedup": bound,
                          "measured_speedup": gain, "measured_speedup_range": [1.0 / ratio["q3"], 1.0 / ratio["q1"]],
                          "of_bound": (gain - 1) / (bound - 1) if bound > 1 else None, "bound_step_us": step_c / bound}


def _ratio_text(ratio: dict | None) -> str:
    if not ratio:
        return "-"
    return f"{ratio['median']:.3f}x [{ratio['q1']:.3f}-{ratio['q3']:.3f}]"


def table(result: dict) -> str:
    """One line per variant and context: median step, ratio to compiled with its quartiles
    over the rounds, % of the HBM floor, the check (float32: ``exactness``), the low-precision
    drift (bf16 runs), prefill and compile time."""
    lines = [f"{'variant':<34}{'context':>8}{'decode (us)':>13}{'vs compiled [q1-q3]':>26}{'% floor':>9}"
             f"{'check':>16}{'drift':>8}{'prefill (ms)':>13}{'compile (s)':>12}"]
    for name, entry in result["variants"].items():
        if "skipped" in entry:
            lines.append(f"{name:<34}  skipped: {entry['skipped']}")
            continue
        for context, us in entry["decode_step_us_by_context"].items():
            ratio = entry.get("ratios", {}).get("compiled", {}).get(f"decode@{context}")
            floor = entry.get("floor_by_context", {}).get(context)
            check = entry.get("check_by_context", {}).get(context)
            check_text = f"{check['max_abs_diff']:.2g} {'ok' if check['ok'] else 'FAIL'}" if check else "-"
            drift = entry.get("drift_by_context", {}).get(context)
            drift_text = f"{drift['max_abs_diff']:.2g}" if drift else "-"
            pct = f"{floor['pct_of_floor']:.0f}" if floor else "-"
            prefill, compile_s = entry.get("prefill_ms"), entry.get("compile_s")
            lines.append(f"{name:<34}{context:>8}{us:>13.1f}{_ratio_text(ratio):>26}{pct:>9}{check_text:>16}"
                         f"{drift_text:>8}{(f'{prefill:.2f}' if prefill is not None else '-'):>13}"
                         f"{(f'{compile_s:.1f}' if compile_s else '-'):>12}")
        for key, over in (("amdahl", "compiled"), ("amdahl_vs_latent", "compiled+latent")):
            if key in entry:
                a = entry[key]
                lines.append(f"{'':<34}  over {over}: attention share {a['attention_share']:.2f}, compressed "
                             f"{a['compressed_fraction']:.2f}: bound {a['bound_speedup']:.3f}x, measured "
                             f"{a['measured_speedup']:.3f}x ({100 * (a['of_bound'] or 0):.0f} % of the bound's gain)")
    steps = result["steps_per_round"]
    lines.append(f"timing: {result['rounds']} interleaved rounds of {steps} step{'s' if steps != 1 else ''} each; "
                 "ratios are per round against the base timed in the same round (median [quartiles])")
    if "floor" in result:
        f = result["floor"]
        lines.append(f"floor: copy bandwidth {f['copy_tb_s']:.2f} TB/s (read + write); "
                     + ", ".join(f"{c}: {v['floor_us_dense']:.0f} us dense / {v['floor_us_sparse']:.0f} us sparse"
                                 for c, v in f["by_context"].items()))
    return "\n".join(lines)


def plot(result: dict, out_dir: Path) -> str:
    """Left: decode step per variant over context. Right: each variant at the longest context,
    with the step's HBM floor (CUDA) drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.2]})
    groups: dict[str, list[tuple[int, float]]] = {}
    for name, entry in result["variants"].items():
        for context, us in entry.get("decode_step_us_by_context", {}).items():
            groups.setdefault(name.split("@")[0], []).append((int(context), us))
    for name, points in groups.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (us)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    longest = str(max(result["contexts"]))
    names = [n for n, e in result["variants"].items() if longest in e.get("decode_step_us_by_context", {})]
    values = [result["variants"][n]["decode_step_us_by_context"][longest] for n in names]
    bars.barh(range(len(names)), values, color="tab:blue")
    bars.set_yticks(range(len(names)), [n.split("@")[0] for n in names], fontsize=8)
    bars.invert_yaxis()
    bars.set_xscale("log")
    bars.set_xlabel(f"decode step at {longest} tokens (us, log)")
    for i, v in enumerate(values):
        bars.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    floor = result.get("floor", {}).get("by_context", {}).get(longest)
    if floor:
        bars.axvline(floor["floor_us_dense"], color="tab:red", linestyle="--",
                     label=f"HBM floor {floor['floor_us_dense']:,.0f} us (dense KV)")
        bars.axvline(floor["floor_us_sparse"], color="tab:orange", linestyle=":",
                     label=f"HBM floor {floor['floor_us_sparse']:,.0f} us (sparse layers)")
        bars.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{result['shape']}, {result['layers']} layers, batch {result['batch']}, {result['dtype']}, "
                 f"on {result['device']}")
    path = out_dir / f"graph_{result['shape']}_{'cuda' if result['device'] != 'cpu' else 'cpu'}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def summary_line(name: str, entry: dict[str, Any]) -> str:
    """One progress line for stderr once a variant is measured."""
    return (f"  {name}: decode {', '.join(f'{c}: {us:.1f} us' for c, us in entry['decode_step_us_by_context'].items())}"
            + (f", prefill {entry['prefill_ms']:.2f} ms" if "prefill_ms" in entry else "")
            + (f", compile {entry['compile_s']:.1f} s" if "compile_s" in entry else "")
            + (f", check {entry['check']['max_abs_diff']:.3g} (ok {entry['check']['ok']})" if "check" in entry else "")
            + (f", {entry['drift']['dtype']} drift {entry['drift']['max_abs_diff']:.3g} (float32 check at the end)"
               if "drift" in entry else ""))
