"""Pattern search for sink+recent compression: the objective measures what the pass computes,
the strategies find known optima, and `omni-passes search-attn` reports, writes and rejects."""

import json
import random

import pytest
import torch

import omni_passes
from omni_passes.attn_search import CalibrationObjective, make_strategy, random_patterns
from omni_passes.attn_search.search import layers_for_budget
from omni_passes.cli import main as cli_main
from omni_passes.models import build_model, load_hf_config

SINK, RECENT = 2, 6


def tiny(layers):
    return build_model(load_hf_config("tiny", layers=layers), seed=0)


def prompts(count=3, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=g) for _ in range(count)]


def test_objective_is_kl_of_the_compiled_pass():
    """objective([1]) equals the KL computed from the model compiled with the pass."""
    torch._dynamo.reset()
    model = tiny(2)
    calib = prompts()
    objective = CalibrationObjective(model, calib, SINK, RECENT)
    batch = torch.stack(calib)
    with torch.no_grad():
        dense = torch.log_softmax(model(batch).logits[:, SINK + RECENT:], -1)
        compiled = omni_passes.compile(model, {"passes": ["sparse_attention"],
                                               "sparse_attention": {"sink": SINK, "recent": RECENT, "pattern": [1]}})
        sparse = torch.log_softmax(compiled(batch).logits[:, SINK + RECENT:], -1)
    expected = float((dense.exp() * (dense - sparse)).sum(-1).mean())
    assert objective([1]) == pytest.approx(expected, rel=1e-4)
    assert objective([]) == 0.0
    assert objective([0, 1]) > 0.0
    evaluations = objective.evaluations
    objective([1, 0])  # cached, order-insensitive
    assert objective.evaluations == evaluations


def test_objective_rejects_short_prompts():
    with pytest.raises(ValueError, match=r"prompts \[1\] have <= sink \+ recent = 8"):
        CalibrationObjective(tiny(1), [torch.arange(20), torch.arange(8)], SINK, RECENT)


def synthetic(costs, pair_penalty):
    """Additive layer costs plus a penalty for compressing two adjacent layers."""
    def objective(pattern):
        pattern = sorted(pattern)
        return sum(costs[i] for i in pattern) + pair_penalty * sum(b - a == 1 for a, b in zip(pattern, pattern[1:]))
    return objective


def brute_force(objective, layers, size):
    from itertools import combinations

    return min((objective(list(c)), list(c)) for c in combinations(range(layers), size))


@pytest.mark.parametrize("name,options", [("greedy", {}), ("genetic", {"population": 12, "generations": 15})])
def test_strategies_find_optimum(name, options):
    costs = [5.0, 1.0, 1.1, 4.0, 0.5, 3.0, 0.7, 2.0]
    objective = synthetic(costs, pair_penalty=0.0 if name == "greedy" else 2.5)
    best_value, best_pattern = brute_force(objective, 8, 3)
    result = make_strategy(name, **options).search(objective, 8, 3, random.Random(0))
    assert result.pattern == best_pattern
    assert result.value == pytest.approx(best_value)


def test_random_patterns_and_budget():
    patterns = random_patterns(6, 2, 50, random.Random(0))
    assert len(patterns) == 15  # all C(6, 2), no duplicates
    assert all(len(p) == 2 and p == sorted(p) for p in patterns)
    assert layers_for_budget(0.5, 61) == 30 and layers_for_budget(0.0, 4) == 0
    with pytest.raises(ValueError, match="fraction"):
        layers_for_budget(1.5, 4)
    with pytest.raises(ValueError, match="unknown search strategy"):
        make_strategy("annealing")


def test_cli_greedy_single_layer_is_exact(tmp_path, capsys):
    """Budget 1 of 4 layers: greedy evaluates every single layer, so its choice is at most the
    best random pattern's KL. The written pass config loads and names the chosen layer."""
    config_path = tmp_path / "passes.json"
    code = cli_main(["search-attn", "--model-config", "tiny", "--budget", "0.25", "--sink", str(SINK),
                     "--recent", str(RECENT), "--calib-count", "2", "--random", "4", "--json",
                     "--write-config", str(config_path)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["compressed_layers"] == 1 and len(result["chosen"]["pattern"]) == 1
    assert result["chosen"]["kl"] <= min(result["random"]["kl"]) + 1e-12
    assert result["random"]["patterns"] == [[0], [1], [2], [3]]
    loaded = omni_passes.PassConfig.load(config_path)
    assert list(loaded.sparse_attention.pattern) == result["chosen"]["pattern"]


@pytest.mark.parametrize("args,message", [
    (["--budget", "1.5"], "fraction of the layers"),
    (["--budget", "0.5", "--recent", "0"], "--recent >= 1"),
    (["--budget", "0.5", "--calib", "CALIB_SHORT"], "have <= sink + recent"),
    (["--budget", "0.5", "--calib", "CALIB_VOCAB"], "token id 9999 outside the vocabulary"),
    (["--budget", "0.5", "--calib", "missing.json"], "no such file"),
])
def test_cli_bad_input(tmp_path, capsys, args, message):
    (tmp_path / "short.json").write_text(json.dumps([[1, 2, 3]]))
    (tmp_path / "vocab.jsonl").write_text(json.dumps({"token_ids": [9999] * 30}) + "\n")
    args = [str(tmp_path / "short.json") if a == "CALIB_SHORT" else str(tmp_path / "vocab.jsonl") if a == "CALIB_VOCAB"
            else str(tmp_path / a) if a == "missing.json" else a for a in args]
    # argparse keeps the last of repeated options, so a case may override --recent
    code = cli_main(["search-attn", "--model-config", "tiny", "--layers", "2", "--sink", str(SINK),
                     "--recent", str(RECENT)] + args)
    assert code == 2
    assert message in capsys.readouterr().err
