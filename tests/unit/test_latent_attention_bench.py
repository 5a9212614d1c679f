"""`omni-passes bench graph` on CPU: one compiled variant over two contexts of different
lengths, with more timed steps than the short cache holds (the default CUDA invocation used to
write past the end of its 128-slot cache), every entry checked against eager; the decode step
the benchmark times sits at the end of the cache and attends to all of it; and variants are
timed in interleaved rounds, each ratio taken within a round and reported with its spread."""

import argparse

import pytest
import torch

from omni_passes.bench import graph


def bench_args(**overrides):
    parser = argparse.ArgumentParser()
    graph.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--shape", "tiny", "--no-prefill"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_one_variant_over_two_contexts():
    torch._dynamo.reset()
    result = graph.run(bench_args(passes="latent", context=[40], short_context=16, repeats=24, rounds=5))
    for name in ("compiled", "compiled+latent"):
        entry = result["variants"][name]
        assert sorted(entry["decode_step_us_by_context"], key=int) == ["16", "40"]
        for context, check in entry["check_by_context"].items():
            assert check["ok"] and check["vs"] == "compiled", (name, context, check)
            assert check["vs_eager"] <= 1e-4 * max(1.0, check["output_scale"]), (name, context, check)
    latent = result["variants"]["compiled+latent"]
    assert latent["report"]["latent_attention"]["matched_layers"] == [0, 1]
    assert 0 < latent["check"]["pass_error"] <= latent["check"]["tolerance"]  # absorbed: reordered, not bit-equal
    assert result["variants"]["compiled"]["check"]["pass_error"] == 0.0
    assert "floor" not in result  # the HBM floor is a CUDA figure
    assert "compile noise" in result["check_rule"]
    # timed in interleaved rounds against compiled: per-round ratios with their spread
    assert result["rounds"] == 5 and result["steps_per_round"] == 24
    for context in ("16", "40"):
        ratio = latent["ratios"]["compiled"][f"decode@{context}"]
        assert ratio["rounds"] == 5
        assert ratio["min"] <= ratio["q1"] <= ratio["median"] <= ratio["q3"] <= ratio["max"]
        assert latent["ratio_vs_compiled"][context] == ratio["median"]
        assert len(latent["decode_step_us_rounds_by_context"][context]) == 5
    # compiled took part in the eager group (all its steps) and the latent group: 5 + 5 samples
    compiled = result["variants"]["compiled"]
    assert len(compiled["decode_step_us_rounds_by_context"]["40"]) == 10
    assert len(compiled["decode_step_us_rounds_by_context"]["16"]) == 10


def test_timed_step_sits_at_the_end_of_the_cache():
    """Repeated steps keep position context - 1 (transformers advances its own write counter),
    and the logits depend on a cache row far from the end (the query sees the whole cache)."""
    from omni_passes.models import build_model

    config = graph.model_config("tiny")
    model = build_model(config, seed=0)
    ids = torch.randint(0, config.vocab_size, (2, 1), generator=torch.Generator().manual_seed(0))
    steps = graph.DecodeSteps(config, ids, "cpu", torch.float32)
    cache = steps.cache(model, 32)
    first = steps.run(model, cache, 32)
    again = steps.run(model, cache, 32)
    assert torch.equal(first, again)
    assert int(cache.layers[0].cumulative_length) == 32  # wrote slot 31, no further
    cache.layers[0].keys[:, :, 2].mul_(-3.0)  # an early latent row
    assert (steps.run(model, cache, 32) - first).abs().max().item() > 1e-4


def test_interleaved_rounds_ratio_does_not_see_the_machine_load():
    """Two steps whose cost is 1 and 3 units of a machine load that changes 20-fold from round
    to round: every per-round ratio is exactly 3, though the steps' own times spread 20-fold;
    one warm-up round is dropped and the order rotates per round."""
    from omni_passes.bench.measure import interleaved_rounds, ratio_stats

    loads = iter([1.0, 7.0, 0.5, 10.0, 2.0, 1.5])  # one load per round (round 0: warm-up)
    calls, current = [], {"load": None, "round": -1, "seen": 0}

    def timer(name, cost):
        def sample():
            if current["seen"] % 2 == 0:  # a new round begins
                current["load"], current["round"] = next(loads), current["round"] + 1
            current["seen"] += 1
            calls.append((current["round"], name))
            return cost * current["load"]
        return sample

    samples = interleaved_rounds({"compiled": timer("compiled", 1.0), "variant": timer("variant", 3.0)}, rounds=5)
    assert samples["compiled"] == [7.0, 0.5, 10.0, 2.0, 1.5]  # warm-up round (load 1.0) dropped
    stats = ratio_stats(samples["variant"], samples["compiled"])
    assert stats == {"median": 3.0, "q1": 3.0, "q3": 3.0, "min": 3.0, "max": 3.0, "rounds": 5, "of_minima": 3.0}
    assert [name for r, name in calls if r == 1] == ["variant", "compiled"]  # order rotated
    assert [name for r, name in calls if r == 2] == ["compiled", "variant"]


def test_ratio_stats_spread_and_errors():
    from omni_passes.bench.measure import ratio_stats

    stats = ratio_stats([2.0, 4.0, 3.0, 10.0], [1.0, 1.0, 1.0, 1.0])
    assert stats["median"] == 3.5 and stats["min"] == 2.0 and stats["max"] == 10.0
    assert stats["q1"] == 2.75 and stats["q3"] == 5.5 and stats["rounds"] == 4 and stats["of_minima"] == 2.0
    with pytest.raises(ValueError, match="3 samples against 2"):
        ratio_stats([1.0, 2.0, 3.0], [1.0, 1.0])


def test_tune_values_parse_per_key_and_bad_ones_name_the_item():
    from omni_passes.bench import attn
    from omni_passes.bench.measure import parse_tune
    from omni_passes.cli.common import UserError

    assert parse_tune(["num_splits=4,programs_per_sm=1.5", "block_n= 64"], {"programs_per_sm": float}) == [
        {"num_splits": 4, "programs_per_sm": 1.5}, {"block_n": 64}]
    assert attn._parse_tune(["use_dot=True,block_h=32", "use_dot=no"]) == [{"use_dot": True, "block_h": 32},
                                                                           {"use_dot": False}]
    with pytest.raises(UserError, match=r"--tune 'block_n=16,num_warps': expected KEY=VALUE pairs"):
        parse_tune(["block_n=16,num_warps"])
    with pytest.raises(ValueError, match="invalid literal for int"):
        parse_tune(["programs_per_sm=1.5"])  # an int key unless a parser is named
