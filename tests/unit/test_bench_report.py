"""The bench table and the suite's goodput summary, from hand-made result documents."""

import json

from proxy.bench import suite
from proxy.bench.metrics import SLO
from proxy.bench.plots import write_plots
from proxy.bench.report import common_load, latency_at, render


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


def point(rate, att, ttft50):
    return {"offered_rate": rate, "slo_attainment": att, "ttft": dist(ttft50), "tpot": dist(0.02),
            "cdf": {"ttft": [ttft50 * k / 10 for k in range(11)], "tpot": [0.002 * k for k in range(11)]},
            "slo_met": 9, "duration_s": 10.0}


def sweep_entry(qpm, points, **extra):
    e = entry(qpm, **extra)
    e["sweep"] = points
    return e


def test_common_load_is_the_highest_rate_everyone_passed():
    entries = {"a": sweep_entry(180, [point(1, 1.0, 0.1), point(2, 0.95, 0.2), point(3, 0.95, 0.3), point(4, 0.5, 1)]),
               "b": sweep_entry(120, [point(1, 1.0, 0.2), point(2, 0.92, 0.5), point(3, 0.6, 2.0)]),
               "c": sweep_entry(0, [point(1, 0.1, 5.0)])}  # passed nothing: does not constrain it
    assert common_load(entries) == 2
    lat = latency_at(entries, 2)
    assert lat["a"]["ttft_p50"] == 0.2 and lat["b"]["ttft_p90"] == 1.0 and "c" not in lat
    assert common_load({"c": entries["c"]}) is None


def test_plots_are_drawn_from_json_alone(tmp_path):
    entries = {"a": sweep_entry(180, [point(1, 1.0, 0.1), point(2, 0.95, 0.2)]),
               "b": sweep_entry(120, [point(1, 1.0, 0.2), point(2, 0.92, 0.5)])}
    paths = write_plots(entries, SLO(1.0, 0.1), tmp_path / "p")
    assert sorted(p.split("/")[-1] for p in paths) == ["goodput_vs_rate.png", "tpot_cdf.png", "ttft_cdf.png",
                                                         "ttft_vs_rate.png"]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_suite_summary_ratios_and_ttft_at_common_load(tmp_path):
    # PD counters: decode instances count the prompts whose KV they pulled as uncached
    pd_sim = {"roles": {"prefill": {"prompt_tokens": 1000, "cached_tokens": 800, "prefix_hit_share": 0.8},
                        "decode": {"prompt_tokens": 1000, "cached_tokens": 0, "prefix_hit_share": 0.0}}}
    routers = {
        "omni": sweep_entry(240.0, [point(2, 1.0, 0.10), point(3, 0.97, 0.12), point(4, 0.95, 0.15)],
                            cpu={"router": {"mean": 12.0, "peak": 30.0}, "machine": {"mean": 20.0, "peak": 40.0}},
                            simulator=pd_sim),
        "vllm-router:round_robin": sweep_entry(120.0, [point(2, 0.93, 0.25), point(3, 0.7, 0.9)]),
        "sglang-router:cache_aware": sweep_entry(180.0, [point(2, 0.99, 0.2), point(3, 0.95, 0.3), point(4, 0.8, 1)]),
    }
    doc = {"sweep": True, "rates": [2.0], "routers": routers, "slo": {"ttft": 1.0, "tpot": 0.1, "attainment": 0.9},
           "cluster": {"label": "1P3D"}}
    (tmp_path / "pd_1p3d_long_prompt.json").write_text(json.dumps(doc))
    over = {"direct": entry(), "omni": entry(added_latency={"ttft": {"p50": 0.0008, "p99": 0.004},
                                                            "e2e": {"p50": 0.001, "p99": 0.005}})}
    (tmp_path / "overhead_200rps.json").write_text(json.dumps({"sweep": False, "rates": [200.0], "routers": over}))
    text = suite.summary(tmp_path)
    # omni 240 vs round robin 120 and the best other 180; common load 2 req/s (round robin
    # passed nothing higher): TTFT p50 0.10 vs 0.25
    assert ("| pd_1p3d_long_prompt | 240 | 120 (vllm-router:round_robin) | 180 (sglang-router:cache_aware) | "
            "2.00x | 1.33x | 2 | 0.100 / 0.250 s = 0.40x |") in text
    assert "| omni | 0.80 | 4.00 | 1.00 | 5.00 | 12 | - | - |" in text
    assert "| direct | (baseline) |" in text
    # per-router detail at the goodput rate: the prefill side's hit share (not pooled with
    # decode's, which would give 0.40), CPU mean / peak, TTFT p50 / p90 at the common load
    assert "| omni | 240 | 95 % | 0.100 / 0.300 | 20.0 / 60.0 | 0.80 | 12 % / 30 % | 40 % | 0.100 / 0.200 |" in text
    assert "| vllm-router:round_robin | 120 | 95 % | 0.100 / 0.300 | 20.0 / 60.0 | 0.50 | 12 % / 30 % | - | 0.250 / 0.500 |" in text
    assert "TTFT p50 / p90 at the common load of every router 2 req/s" in text

    # a router that passed only a rate omni and round robin did not run leaves no common load of
    # every router; the TTFT comparison is then made at omni's and round robin's (2 req/s)
    routers["omni:cache_aware"] = sweep_entry(90.0, [point(1.5, 0.95, 0.05), point(2.5, 0.5, 2.0)])
    (tmp_path / "pd_1p3d_long_prompt.json").write_text(json.dumps(doc))
    text = suite.summary(tmp_path)
    assert "| 2.00x | 1.33x | 2 | 0.100 / 0.250 s = 0.40x |" in text
    assert "TTFT p50 / p90 at the common load of omni and round robin 2 req/s" in text
    assert "| omni:cache_aware | 90 |" in text


def test_sweep_refinement_bisects_the_edge_to_the_step():
    from proxy.bench.runner import refine_rate

    points = [(24.0, True), (28.0, True), (32.0, False)]
    assert refine_rate(points, 0.05) == round((28 * 32) ** 0.5, 2)  # 29.93
    points.append((29.93, True))
    assert refine_rate(points, 0.05) == round((29.93 * 32) ** 0.5, 2)  # 30.95
    points.append((30.95, False))
    assert refine_rate(points, 0.05) is None  # 30.95 / 29.93 = 1.034: within 5 %
    assert refine_rate([(10.0, False), (12.0, False)], 0.05) is None  # nothing passed
    assert refine_rate([(10.0, True), (12.0, True)], 0.05) is None  # nothing failed above
    assert refine_rate([(10.0, True), (12.0, False)], 0.0) is None  # off


def test_plan_pd_bypass_and_option_arguments():
    import pytest

    from proxy.bench.plan_pd import AUTO, Candidate, _bypass, _options

    assert _bypass("32,auto,0,32") == [AUTO, 0, 32]
    assert Candidate(1, 3, AUTO).label == "1P:3D bypass auto" and Candidate(0, 4, None).label == "collocated x4"
    with pytest.raises(ValueError, match="'auto' or non-negative integers"):
        _bypass("-1")
    with pytest.raises(ValueError, match="'auto' or non-negative integers"):
        _bypass("often")
    assert _options(["ttft_share=0.4", "decode_max_running=24"]) == {"ttft_share": 0.4, "decode_max_running": 24}
    with pytest.raises(ValueError, match="KEY one of"):
        _options(["bypass_tokens=3"])  # given per candidate by --bypass
    with pytest.raises(ValueError, match="ttft_share must be in"):
        _options(["ttft_share=2"])


def test_profile_shares_count_the_event_loop_only_first_part_wins():
    from proxy.bench.profile import UVLOOP, shares

    loop = "<module> (proxy/cli.py:5);run (uvloop/__init__.py:1);Runner.run (asyncio/runners.py:118)"
    lines = [
        f"{loop};ProxyServer._handle (proxy/server/app.py:250);Intake.prepare (proxy/server/intake.py:166) 3",
        # placement inside the handler: placement, not "rest of the handler"
        f"{loop};ProxyServer._handle (proxy/server/app.py:250);Router.place (proxy/server/routing.py:90) 2",
        f"{loop} 4",  # uvloop's own C work
        f"{loop};Upstream.send (proxy/server/upstream.py:55);MutexValue.inc (prometheus_client/values.py:1) 1",
        "Thread._bootstrap (threading.py:1);Condition.wait (threading.py:2) 50",  # another thread: ignored
        "",
    ]
    total, parts = shares(lines)
    assert total == 10
    assert parts == {"prepare: parse, validate, tokenize, hash blocks": 0.3,
                     "placement: policy choice, load, hold queue": 0.2,
                     "metrics (prometheus_client)": 0.1,  # listed before the HTTP client
                     UVLOOP: 0.4}
    assert shares(["Thread._bootstrap (threading.py:1) 5"]) == (0, {})
