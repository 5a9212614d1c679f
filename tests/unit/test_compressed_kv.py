"""CompressedStaticCache: graph-mode decode over sink + ring slots equals dense-cache decode
with the sink+recent mask; compressed layers' memory does not grow with the context."""

import pytest
import torch
from transformers import StaticCache

import omni_passes
from omni_passes.kvcache.attention import masked_reference, use_sliced_masks
from omni_passes.kvcache.compressed import CompressedStaticCache, SinkRecentLayer, ring_slot
from omni_passes.models import build_model, load_hf_config

SINK, RECENT = 4, 8
ATOL = 1e-5


def tiny(layers=3):
    return build_model(load_hf_config("tiny", layers=layers), seed=0)


def tokens(batch, length, seed=5):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_logits(forward, ids, cache, steps):
    logits = [forward(ids, cache)]
    for _ in range(steps):
        logits.append(forward(logits[-1].argmax(-1, keepdim=True), cache))
    return torch.stack(logits, 1)


def step(model):
    return lambda x, cache: model(x, past_key_values=cache, use_cache=True).logits[:, -1]


def reference(model, ids, pattern, max_len, steps):
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    with torch.no_grad(), masked_reference(model, SINK, RECENT, pattern):
        return greedy_logits(step(model), ids, cache, steps)


def test_compiled_decode_equals_dense_cache_with_mask():
    """Prompt 20 (> 12 slots), 20 decode steps: the ring wraps twice. One decode graph."""
    torch._dynamo.reset()
    model = tiny()
    ids, pattern, max_len, steps = tokens(2, 20), [0, 2], 48, 20
    expected = reference(model, ids, pattern, max_len, steps)
    use_sliced_masks(model)
    compiled = omni_passes.compile(model, {"passes": ["sparse_attention"],
                                           "sparse_attention": {"sink": SINK, "recent": RECENT, "pattern": pattern}})
    cache = CompressedStaticCache(model.config, max_len, SINK, RECENT, pattern)
    with torch.no_grad():
        got = greedy_logits(step(compiled), ids, cache, steps)
    assert compiled.omni.manager.graphs_seen == 2  # prefill, and one decode graph for all steps
    assert compiled.omni.report()["passes"]["sparse_attention"]["matched_layers"] == pattern
    assert (got - expected).abs().max().item() < ATOL
    report = cache.memory_report()
    assert [entry["slots"] for entry in report["layers"]] == [SINK + RECENT, max_len, SINK + RECENT]
    assert report["saved_bytes"] == report["full_bytes"] - report["bytes"] > 0


def test_eager_decode_over_ring_is_sink_recent():
    """Without any pass: a prompt that fits the slots, then decode far past them; the sliced
    mask over the ring gives exactly the sink+recent keys."""
    model = tiny(layers=2)
    ids, pattern, max_len, steps = tokens(1, SINK + RECENT - 2), [1], 40, 24
    expected = reference(model, ids, pattern, max_len, steps)
    use_sliced_masks(model)
    cache = CompressedStaticCache(model.config, max_len, SINK, RECENT, pattern)
    with torch.no_grad():
        got = greedy_logits(step(model), ids, cache, steps)
    assert (got - expected).abs().max().item() < ATOL


def test_memory_of_compressed_layers_constant_in_context():
    model = tiny(layers=3)
    use_sliced_masks(model)
    reports = {}
    for max_len in (64, 1024):
        cache = CompressedStaticCache(model.config, max_len, SINK, RECENT, [1, 2])
        with torch.no_grad():
            model(tokens(2, 6), past_key_values=cache, use_cache=True)
        reports[max_len] = cache.memory_report()
    small, large = reports[64]["layers"], reports[1024]["layers"]
    for layer in (1, 2):
        assert small[layer]["bytes"] == large[layer]["bytes"]          # constant in context
        assert small[layer]["slots"] == SINK + RECENT
    assert large[0]["bytes"] == 16 * small[0]["bytes"]                  # dense layer grows
    # bytes per slot: batch 2 x (kv_lora_rank 32 + rope 16) floats
    per_slot = 2 * (32 + 16) * 4
    assert reports[1024]["saved_bytes"] == 2 * (1024 - SINK - RECENT) * per_slot


def test_ring_layout():
    """Slot contents after each decode write: sink positions stay, the ring holds the last
    `recent` positions."""
    layer = SinkRecentLayer(max_cache_len=100, sink=2, recent=3)
    for position in range(9):
        value = torch.full((1, 1, 1, 1), float(position))
        layer.update(value, value)
        held = sorted(int(x) for x in layer.keys.flatten()[: min(position + 1, 5)])
        expected = sorted(set(range(min(2, position + 1))) | set(range(max(2, position - 2), position + 1)))
        assert held == expected, position
    assert ring_slot(torch.tensor(7), 2, 3).item() == 2 + (7 - 2) % 3


def test_bad_arguments_and_chunked_prefill():
    config = load_hf_config("tiny", layers=2)
    with pytest.raises(ValueError, match=r"pattern names layer\(s\) \[2\]"):
        CompressedStaticCache(config, 64, SINK, RECENT, [2])
    with pytest.raises(ValueError, match="recent >= 1"):
        CompressedStaticCache(config, 64, SINK, 0, [0])
    layer = SinkRecentLayer(max_cache_len=64, sink=2, recent=3)
    layer.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))
    with pytest.raises(RuntimeError, match="chunked prefill"):
        layer.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))
