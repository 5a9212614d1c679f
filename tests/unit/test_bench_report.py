"""The bench table and the suite's goodput summary, from hand-made result documents."""

import json

from proxy.bench import suite
from proxy.bench.report import render


def dist(p50):
    return {"mean": p50, "p50": p50, "p90": p50 * 2, "p99": p50 * 3}


def entry(qpm=None, **extra):
    e = {"router": "x", "mode": "collocated", "offered_rate": 2.0, "completed": 10, "failed": 0,
         "ttft": dist(0.1), "tpot": dist(0.02), "itl": dist(0.02), "e2e": dist(1.0), "slo_attainment": 0.95,
         "cpu": {"router": {"mean": 12.0, "peak": 30.0}}, "simulator": {"roles": {"collocated": {"prefix_hit_share": 0.5}}}}
    if qpm is not None:
        e["goodput_qpm"] = qpm
        e["sweep"] = [{"offered_rate": 1.0, "slo_attainment": 1.0}, {"offered_rate": 2.0, "slo_attainment": 0.95}]
    e.update(extra)
    return e


def test_table_rows_for_results_skips_and_errors():
    text = render({"omni": entry(120.0), "sglang-router:cache_aware": {"mode": "pd", "skipped": "bootstrap protocol"},
                   "vllm-router:round_robin": {"mode": "pd", "error": "did not become healthy"}}, ["header"])
    lines = text.splitlines()
    assert lines[0] == "header"
    omni = next(line for line in lines if line.startswith("omni "))
    assert "120" in omni and "10/0" in omni and "0.100/0.200/0.300" in omni and "20.0/40.0/60.0" in omni
    assert "95%" in omni and "50%" in omni
    assert any("skipped: bootstrap protocol" in line for line in lines)
    assert any("error: did not become healthy" in line for line in lines)
    assert any(line.startswith("SLO met at rate") for line in lines)


def test_suite_summary_ratios(tmp_path):
    cached = entry(240.0, cpu={"router": {"mean": 12.0, "peak": 30.0}, "machine": {"mean": 20.0, "peak": 40.0}},
                   # PD counters: decode instances count the prompts whose KV they pulled as uncached
                   simulator={"roles": {"prefill": {"prompt_tokens": 1000, "cached_tokens": 800, "prefix_hit_share": 0.8},
                                        "decode": {"prompt_tokens": 1000, "cached_tokens": 0, "prefix_hit_share": 0.0}}})
    routers = {"omni:cache_aware": cached, "omni": entry(180.0), "vllm-router:round_robin": entry(120.0),
               "sglang-router:cache_aware": entry(200.0)}
    (tmp_path / "colloc4_multi_turn.json").write_text(json.dumps({"sweep": True, "rates": [1.0], "routers": routers}))
    over = {"direct": entry(), "omni": entry(added_latency={"ttft": {"p50": 0.0008, "p99": 0.004},
                                                            "e2e": {"p50": 0.001, "p99": 0.005}})}
    (tmp_path / "overhead_200rps.json").write_text(json.dumps({"sweep": False, "rates": [200.0], "routers": over}))
    text = suite.summary(tmp_path)
    # best of ours 240 vs round_robin 120 and best peer 200
    assert "| colloc4_multi_turn | 240 (omni:cache_aware) | 120 | 200 (sglang-router:cache_aware) | 2.00x | 1.20x |" in text
    assert "| omni | 0.80 | 4.00 | 1.00 | 5.00 | 12 | - | - |" in text
    assert "| direct | (baseline) |" in text
    # per-router detail at the goodput rate: the prefill side's hit share (not pooled with
    # decode's, which would give 0.40), CPU mean / peak
    assert "| omni:cache_aware | 240 | 95 % | 0.100 / 0.300 | 20.0 / 60.0 | 0.80 | 12 % / 30 % | 40 % |" in text
    assert "| omni | 180 | 95 % | 0.100 / 0.300 | 20.0 / 60.0 | 0.50 | 12 % / 30 % | - |" in text
