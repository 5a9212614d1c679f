"""`omni` with its defaults against round robin, end to end on the virtual clock (simulators, our
proxy and the client over real sockets in one process; simulated time, so the figures are the
timing model's, not this machine's load). Small fixed workloads: seeded generators, committed
cluster files. The policy is told the run's SLO and nothing else."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "proxy" / "bench" / "data"


def bench(*args, timeout=400):
    cmd = [sys.executable, "-m", "proxy.cli", "bench", "--clock", "virtual", "--json", "--no-progress",
           "--router", "omni", "--router", "omni:round_robin", "--slo", "ttft=1,tpot=0.1", *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["routers"]


def by_rate(entry):
    return {p["offered_rate"]: p for p in entry["sweep"]}


def test_omni_defaults_beat_round_robin_on_prefix_heavy_chat():
    # 2 instances of the bench profile, multi-turn chat: a turn's history is cached where the
    # conversation ran; round robin recomputes it 1 time in 2
    routers = bench("--cluster", str(DATA / "ci_colloc2.json"), "--synthetic", "multi_turn", "--duration", "15",
                    "--sweep", "--rates", "8,11,14,17")
    omni, rr = routers["omni"], routers["omni:round_robin"]
    assert omni["goodput_qpm"] > rr["goodput_qpm"], (omni["goodput_qpm"], rr["goodput_qpm"])
    common = sorted(set(by_rate(omni)) & set(by_rate(rr)))
    for rate in common:  # at every load both ran, omni meets the SLO at least as often
        assert by_rate(omni)[rate]["slo_attainment"] >= by_rate(rr)[rate]["slo_attainment"], rate
    hit = {name: by_rate(e)[common[-1]]["simulator"]["roles"]["collocated"]["prefix_hit_share"]
           for name, e in routers.items()}
    assert hit["omni"] > hit["omni:round_robin"] + 0.05, hit  # the prefix cache is why


def test_omni_defaults_cut_ttft_on_pd_long_prompts():
    # 1 prefill + 2 decode instances, long prompts: shortest-predicted-first release at the
    # prefill instance and bypass of congested prefills cut TTFT; goodput at least round robin's
    routers = bench("--cluster", str(DATA / "ci_pd_1p2d.json"), "--synthetic", "long_prompt", "--duration", "12",
                    "--sweep", "--rates", "5,7,9")
    omni, rr = routers["omni"], routers["omni:round_robin"]
    assert omni["goodput_qpm"] >= rr["goodput_qpm"], (omni["goodput_qpm"], rr["goodput_qpm"])
    common = sorted(set(by_rate(omni)) & set(by_rate(rr)))
    assert common
    for rate in common:
        assert by_rate(omni)[rate]["ttft"]["p50"] < by_rate(rr)[rate]["ttft"]["p50"], rate


def test_omni_defaults_beat_round_robin_on_a_public_trace_window(tmp_path):
    # the first 600 requests of the committed Azure code-trace window (a development trace, read
    # as published), 2 instances: prompts of very different lengths arriving in bursts; placing
    # by predicted first token keeps long prefills from queueing behind each other
    window = tmp_path / "azure_code_600.csv"
    window.write_text("".join((DATA / "azure_code_3000.csv").read_text().splitlines(keepends=True)[:601]))
    routers = bench("--cluster", str(DATA / "ci_colloc2.json"), "--workload", str(window), "--slo",
                    "ttft=2,tpot=0.25", "--sweep", "--rates", "5,7,9")
    omni, rr = routers["omni"], routers["omni:round_robin"]
    assert omni["goodput_qpm"] > rr["goodput_qpm"], (omni["goodput_qpm"], rr["goodput_qpm"])
    for rate in sorted(set(by_rate(omni)) & set(by_rate(rr))):
        assert by_rate(omni)[rate]["slo_attainment"] >= by_rate(rr)[rate]["slo_attainment"], rate
