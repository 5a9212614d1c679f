"""`omni-proxy plan-pd` and virtual-clock bench runs: our proxy and simulators in one process on
a simulated clock, so timings equal the timing model exactly and splits are chosen for the
reason the workload gives."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ZERO = {"prefill_token_s": 0.0, "prefill_attn_s": 0.0, "decode_seq_s": 0.0, "decode_kv_token_s": 0.0,
        "kv_transfer_base_s": 0.0, "kv_transfer_token_s": 0.0}


def write_inputs(tmp_path, profile, n, gap, prompt, output, instances):
    (tmp_path / "cluster.json").write_text(json.dumps(
        {"instances": [{"role": "collocated", "count": instances, "profile": {**ZERO, **profile}}]}))
    (tmp_path / "w.jsonl").write_text("".join(json.dumps(
        {"arrival_s": k * gap, "prompt_tokens": prompt, "output_tokens": output, "prefix_group": None,
         "prefix_tokens": 0}) + "\n" for k in range(n)))


def cli(*args, timeout=300):
    done = subprocess.run([sys.executable, "-m", "proxy.cli", *args, "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_virtual_clock_bench_measures_the_timing_model_exactly(tmp_path):
    write_inputs(tmp_path, {"step_overhead_s": 0.05}, n=5, gap=1.0, prompt=24, output=4, instances=2)
    doc = cli("bench", "--clock", "virtual", "--cluster", str(tmp_path / "cluster.json"), "--workload",
              str(tmp_path / "w.jsonl"), "--router", "omni", "--router", "vllm-router:round_robin", "--rate", "1",
              "--no-progress")
    omni = doc["routers"]["omni"]
    assert omni["completed"] == 5 and doc["clock"] == "virtual"
    # a lone request: first token after one 50 ms step, then one step per token
    assert omni["ttft"]["p50"] == pytest.approx(0.05, abs=1e-9) and omni["ttft"]["p99"] == pytest.approx(0.05, abs=1e-9)
    assert omni["tpot"]["p99"] == pytest.approx(0.05, abs=1e-9)
    assert omni["e2e"]["p50"] == pytest.approx(0.2, abs=1e-9)
    assert "peers run in wall-clock time" in doc["routers"]["vllm-router:round_robin"]["skipped"]


def test_plan_pd_gives_prefill_heavy_work_more_prefill(tmp_path):
    # prompts of 200 tokens at 2 ms/token: 0.4 s of prefill each, 2-token answers. At 4 req/s
    # one prefill instance would need 1.6 s of work per second; two need 0.8.
    write_inputs(tmp_path, {"step_overhead_s": 0.005, "prefill_token_s": 0.002}, n=24, gap=0.25, prompt=200,
                 output=2, instances=3)
    doc = cli("plan-pd", "--cluster", str(tmp_path / "cluster.json"), "--workload", str(tmp_path / "w.jsonl"),
              "--slo", "ttft=1.0,tpot=1.0", "--rates", "2,4", "--refine", "0", "--bypass", "0", "--no-collocated")
    by_split = {(c["prefill"], c["decode"]): c for c in doc["candidates"]}
    assert set(by_split) == {(1, 2), (2, 1)}
    assert by_split[(2, 1)]["goodput_qpm"] == 240.0 and by_split[(1, 2)]["goodput_qpm"] == 120.0
    assert doc["recommendation"] == {"prefill": 2, "decode": 1, "mode": "pd", "bypass_tokens": 0, "goodput_qpm": 240.0}
    assert doc["clock"] == "virtual"


def test_plan_pd_gives_decode_heavy_work_more_decode(tmp_path):
    # 40-token answers; a decode step costs 5 ms + 10 ms per running sequence, so TPOT stays
    # under 50 ms with at most 4 sequences on an instance. At 4 req/s about 6 run at once.
    write_inputs(tmp_path, {"step_overhead_s": 0.005, "decode_seq_s": 0.01, "prefill_token_s": 0.0005}, n=24,
                 gap=0.25, prompt=16, output=40, instances=3)
    doc = cli("plan-pd", "--cluster", str(tmp_path / "cluster.json"), "--workload", str(tmp_path / "w.jsonl"),
              "--slo", "ttft=1.0,tpot=0.05", "--rates", "2,4", "--refine", "0", "--bypass", "0,64")
    rec = doc["recommendation"]
    by = {(c["prefill"], c["decode"], c["bypass_tokens"]): c["goodput_qpm"] for c in doc["candidates"]}
    assert by[(1, 2, 0)] == 240.0 and by[(2, 1, 0)] == 120.0
    # bypassing prefill puts the (tiny) prompts on the decode instances: no harm here
    assert by[(1, 2, 64)] == 240.0
    assert (rec["prefill"], rec["decode"]) in ((0, 3), (1, 2)) and rec["goodput_qpm"] == 240.0
    assert any(c["mode"] == "collocated" for c in doc["candidates"])


def test_sweep_steps_below_a_failing_lowest_rate(tmp_path):
    # one instance, 0.4 s of prefill per request: 3 req/s cannot be served, 2 req/s can
    write_inputs(tmp_path, {"step_overhead_s": 0.005, "prefill_token_s": 0.002}, n=20, gap=0.5, prompt=200,
                 output=2, instances=1)
    doc = cli("bench", "--clock", "virtual", "--cluster", str(tmp_path / "cluster.json"), "--workload",
              str(tmp_path / "w.jsonl"), "--router", "omni", "--sweep", "--rates", "3,4", "--slo", "ttft=1,tpot=1",
              "--no-progress")
    omni = doc["routers"]["omni"]
    assert [p["offered_rate"] for p in omni["sweep"]] == [2.0, 3.0]
    assert [p["slo_attainment"] >= 0.9 for p in omni["sweep"]] == [True, False]
    assert omni["goodput_qpm"] == 120.0 and omni["offered_rate"] == 2.0
