"""End-to-end `omni-proxy bench` runs (seconds): real simulator and router processes, real
sockets, the JSON document on stdout."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PEER = Path(sys.executable).parent / "vllm-router"
HAVE_VLLM_ROUTER = PEER.exists() or shutil.which("vllm-router") is not None

# one step = 50 ms, nothing else costs time: a lone request's TTFT is one step (its prefill,
# which samples the first token) and every further token one more step
STEP_S = 0.05
PROFILE = {"step_overhead_s": STEP_S, "prefill_token_s": 0.0, "prefill_attn_s": 0.0, "decode_seq_s": 0.0,
           "decode_kv_token_s": 0.0, "kv_transfer_base_s": 0.0, "kv_transfer_token_s": 0.0}


def bench(tmp_path, cluster, lines, *args, timeout=120):
    (tmp_path / "cluster.json").write_text(json.dumps(cluster))
    (tmp_path / "w.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cmd = [sys.executable, "-m", "proxy.cli", "bench", "--cluster", str(tmp_path / "cluster.json"),
           "--workload", str(tmp_path / "w.jsonl"), "--json", "--no-progress", *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout), done.stderr  # stdout holds exactly one JSON document


def spaced(n, gap, prompt=24, output=4, group=None, prefix=0):
    return [{"arrival_s": k * gap, "prompt_tokens": prompt, "output_tokens": output,
             "prefix_group": group, "prefix_tokens": prefix} for k in range(n)]


def check_entry_schema(entry, n):
    for metric in ("ttft", "tpot", "itl", "e2e"):
        assert set(entry[metric]) == {"mean", "p50", "p90", "p99"}
        assert all(isinstance(entry[metric][q], float) for q in ("p50", "p90", "p99"))
    assert entry["completed"] == n and entry["failed"] == 0
    assert {"simulator", "router", "client"} <= set(entry["cpu"])


def test_bench_omni_collocated_timing_and_schema(tmp_path):
    cluster = {"instances": [{"role": "collocated", "count": 2, "profile": PROFILE}]}
    # 6 requests 0.4 s apart at the file's pace (rate 2.5/s): each runs alone on its instance
    doc, err = bench(tmp_path, cluster, spaced(6, 0.4), "--router", "omni", "--rate", "2.5",
                     "--slo", "ttft=1,tpot=0.5")
    entry = doc["routers"]["omni"]
    check_entry_schema(entry, 6)
    assert "goodput_qpm" not in entry and entry["slo_attainment"] == 1.0
    # measured against the timing model: one step to the first token, one step per token after
    assert STEP_S <= entry["ttft"]["p50"] < STEP_S + 0.1
    assert STEP_S * 0.9 <= entry["tpot"]["p50"] < STEP_S + 0.05
    assert 4 * STEP_S <= entry["e2e"]["p50"] < 4 * STEP_S + 0.2
    assert doc["cluster"]["mode"] == "collocated" and doc["rates"] == [2.5]
    assert doc["workload"]["shape_at_rate"]["requests"] == 6
    assert entry["simulator"]["roles"]["collocated"]["finished"] == 6 + 1  # and the warm-up request
    assert "router" in err and "omni" in err  # the table went to stderr


def test_bench_sweep_reports_goodput_and_pd_mode(tmp_path):
    cluster = {"instances": [{"role": "prefill", "count": 1, "profile": PROFILE},
                             {"role": "decode", "count": 1, "profile": PROFILE}]}
    doc, _ = bench(tmp_path, cluster, spaced(5, 0.3, prompt=200, group="g", prefix=16), "--router", "omni",
                   "--router", "sglang-router:cache_aware", "--sweep", "--rates", "2,4",
                   "--slo", "ttft=1,tpot=0.5", "--plot", str(tmp_path / "plots"))
    for name in ("ttft_cdf.png", "tpot_cdf.png", "goodput_vs_rate.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    omni = doc["routers"]["omni"]
    check_entry_schema(omni, 5)
    assert omni["mode"] == "pd" and omni["goodput_qpm"] == pytest.approx(240.0)
    assert [p["offered_rate"] for p in omni["sweep"]] == [2.0, 4.0]
    roles = omni["simulator"]["roles"]
    # every request is decoded on D (the shown point's fresh simulators: 5 requests and the
    # warm-up); those not bypassed were prefilled on P, whose KV D pulled. Here prefill costs
    # nothing but a step, so skipping P saves a step: omni bypasses once it has learned that
    assert roles["decode"]["finished"] == 5 + 1
    assert 1 <= roles["prefill"]["finished"] <= 5 and roles["prefill"]["kv_pulled"] == roles["prefill"]["finished"]
    assert "bootstrap" in doc["routers"]["sglang-router:cache_aware"]["skipped"]


@pytest.mark.skipif(not HAVE_VLLM_ROUTER, reason="vllm-router is not installed (dev extra)")
def test_bench_peer_and_direct_give_added_latency(tmp_path):
    cluster = {"instances": [{"role": "collocated", "count": 2, "profile": PROFILE}]}
    doc, _ = bench(tmp_path, cluster, spaced(6, 0.25), "--router", "direct", "--router", "vllm-router:round_robin",
                   "--router", "omni:round_robin", "--rate", "4", "--slo", "ttft=1,tpot=0.5")
    for name in ("direct", "vllm-router:round_robin", "omni:round_robin"):
        check_entry_schema(doc["routers"][name], 6) if name != "direct" else None
        assert doc["routers"][name]["completed"] == 6
    for name in ("vllm-router:round_robin", "omni:round_robin"):
        added = doc["routers"][name]["added_latency"]
        assert set(added) == {"ttft", "e2e"} and isinstance(added["ttft"]["p50"], float)
        # a router adds far less than one engine step to a request
        assert added["ttft"]["p50"] < STEP_S
    assert doc["machine"]["vllm-router"]


def test_bench_rejects_bad_input(tmp_path):
    (tmp_path / "c.json").write_text('{"instances": [{"role": "collocated"}]}')
    (tmp_path / "w.jsonl").write_text('{"arrival_s": 0, "prompt_tokens": 4, "output_tokens": 1}\n{"arrival_s": 1}\n')
    cmd = [sys.executable, "-m", "proxy.cli", "bench", "--cluster", str(tmp_path / "c.json"),
           "--workload", str(tmp_path / "w.jsonl"), "--router", "omni", "--rate", "1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "w.jsonl line 2: missing field(s) prompt_tokens, output_tokens" in done.stderr and not done.stdout
    done = subprocess.run(cmd[:-4] + ["--router", "haproxy", "--rate", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown router 'haproxy'" in done.stderr


def _children_running(parent: int, needle: str) -> list[int]:
    """PIDs of processes whose parent is ``parent`` and whose command line contains ``needle``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and needle in cmdline:
            found.append(int(proc.name))
    return found


def test_bench_reports_a_simulator_killed_mid_point_as_an_error(tmp_path):
    """A simulator that dies during a point voids that router's result with a message naming it;
    the run still ends with its JSON document (other routers would go on; exit code 1 since
    every router of this run failed)."""
    import signal
    import time

    cluster = {"instances": [{"role": "collocated", "count": 2, "profile": PROFILE}]}
    (tmp_path / "cluster.json").write_text(json.dumps(cluster))
    # 10 s of requests; the kill comes 5 s after the router process appears (start-up and
    # warm-up take 1-2 s here), so it lands inside the point
    (tmp_path / "w.jsonl").write_text("\n".join(json.dumps(x) for x in spaced(100, 0.1, output=8)) + "\n")
    cmd = [sys.executable, "-m", "proxy.cli", "bench", "--cluster", str(tmp_path / "cluster.json"),
           "--workload", str(tmp_path / "w.jsonl"), "--json", "--no-progress", "--router", "omni", "--rate", "10",
           "--timeout", "20"]
    bench_proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        sims: list[int] = []
        routers: list[int] = []
        while not (sims and routers) and time.monotonic() < deadline:
            sims = _children_running(bench_proc.pid, "proxy.bench.simhost")
            routers = _children_running(bench_proc.pid, "proxy.cli serve")
            time.sleep(0.1)
        assert sims and routers, "the simulator or the router never started"
        time.sleep(5.0)
        os.kill(sims[0], signal.SIGKILL)
        out, err = bench_proc.communicate(timeout=120)
    finally:
        if bench_proc.poll() is None:
            bench_proc.kill()
    assert bench_proc.returncode == 1, err[-3000:]  # 1: every router of the run failed
    entry = json.loads(out)["routers"]["omni"]
    assert "simulator process exited with code -9 during the point" in entry["error"], entry
