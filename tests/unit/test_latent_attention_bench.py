"""`omni-passes bench graph` on CPU: one compiled variant over two contexts of different
lengths, with more timed steps than the short cache holds (the default CUDA invocation used to
write past the end of its 128-slot cache), every entry checked against eager; and the decode
step the benchmark times sits at the end of the cache and attends to all of it."""

import argparse

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
    result = graph.run(bench_args(passes="latent", context=[40], short_context=16, repeats=24))
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


def test_timed_step_sits_at_the_end_of_the_cache():
    """Repeated steps keep position context - 1 (transformers advances its own write counter),
    and the logits depend on a cache row far from the end (the query sees the whole cache)."""
    from omni_passes.models import build_model

    config = graph._config(bench_args())
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
