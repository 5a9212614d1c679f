"""Synthetic traces: shapes, determinism, and the published statistics they are calibrated on."""

import numpy as np
import pytest
import torch

from omni_passes.placement import metrics, traces
from omni_passes.placement.placement import Placement


def hot_set(loads: torch.Tensor, k: int = 16) -> list[set]:
    return [set(row.argsort(descending=True)[:k].tolist()) for row in loads]


def overlap(a: list[set], b: list[set]) -> float:
    return float(np.mean([len(x & y) / len(x) for x, y in zip(a, b)]))


def test_shape_dtype_and_determinism():
    spec = traces.get_spec("deepseek-translation", steps=12)
    a, b = traces.generate(spec), traces.generate(spec)
    assert a.shape == (12, 58, 256) and a.dtype == torch.int32
    assert torch.equal(a, b)
    assert not torch.equal(a, traces.generate(traces.get_spec("deepseek-translation", steps=12, seed=99)))
    # every step routes about tokens_per_step x top_k tokens per layer (Poisson)
    per_layer = a.sum(-1).double()
    assert abs(per_layer.mean().item() / (4096 * 8) - 1) < 0.01
    qwen = traces.generate(traces.get_spec("qwen3-30b-a3b", steps=3))
    assert qwen.shape == (3, 48, 128)


def test_calibrated_on_tensorrt_llm_deepseek_r1_ep32_figures():
    trace = traces.generate(traces.get_spec("deepseek-translation", steps=40))
    identity = Placement.identity(58, 256, num_ranks=32, slots_per_rank=8)
    rank_ratio = [metrics.score(identity, step).mean_imbalance for step in trace[::4]]
    # TensorRT-LLM: max/mean rank load 2.56 without balancing (EP32, per step, mean over layers)
    assert 2.3 < float(np.mean(rank_ratio)) < 2.85
    per_step = trace.double()
    expert_ratio = (per_step.max(-1).values / per_step.mean(-1)).mean().item()
    cv = (per_step.std(-1) / per_step.mean(-1)).mean().item()
    # ... max/mean expert load 11.9 and CV 1.28
    assert 9.5 < expert_ratio < 14.5
    assert 1.1 < cv < 1.5


def test_hot_spots_persist_within_a_dataset_and_differ_between_datasets():
    a = traces.generate(traces.get_spec("deepseek-translation", steps=300))
    w = traces.windows(a, 100)
    # tens to hundreds of steps: consecutive windows share most hot experts
    assert overlap(hot_set(w[0]), hot_set(w[1])) > 0.8
    gsm = traces.windows(traces.generate(traces.get_spec("deepseek-gsm8k", steps=100)), 100)
    assert overlap(hot_set(w[0]), hot_set(gsm[0])) < 0.5
    # the hottest layers differ between datasets too
    ident = Placement.identity(58, 256, num_ranks=32, slots_per_rank=8)
    worst = lambda x: set(np.argsort(metrics.score(ident, x).imbalance)[-5:].tolist())  # noqa: E731
    assert len(worst(w[0]) & worst(gsm[0])) <= 2


def test_drift_and_dataset_switch():
    fast = traces.windows(traces.generate(traces.get_spec("deepseek-drift", steps=600, num_layers=16)), 100)
    slow = traces.windows(traces.generate(traces.get_spec("deepseek-translation", steps=600, num_layers=16)), 100)
    assert overlap(hot_set(fast[0]), hot_set(fast[5])) < overlap(hot_set(slow[0]), hot_set(slow[5]))
    shift = traces.windows(traces.generate(traces.get_spec("deepseek-shift", steps=800, num_layers=16)), 100)
    within, across = overlap(hot_set(shift[1]), hot_set(shift[3])), overlap(hot_set(shift[3]), hot_set(shift[4]))
    assert within > 0.8 and across < 0.6
    # it switches back to the first profile after another 400 steps
    back = traces.windows(traces.generate(traces.get_spec("deepseek-shift", steps=900, num_layers=16)), 100)
    assert overlap(hot_set(back[0]), hot_set(back[8])) > 0.7


def test_windows_sum_and_drop_the_tail():
    trace = torch.arange(2 * 3 * 4, dtype=torch.int32).reshape(2, 3, 4).repeat(5, 1, 1)[:7]
    w = traces.windows(trace, 3)
    assert w.shape == (2, 3, 4) and w.dtype == torch.int64
    assert torch.equal(w[1], trace[3:6].sum(0))
    with pytest.raises(ValueError, match="window must be in"):
        traces.windows(trace, 0)
    with pytest.raises(ValueError, match="must be \\[steps, layers, experts\\]"):
        traces.windows(trace[0], 1)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(num_experts=100, num_groups=8), "not divisible by num_groups"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(drift_share=1.5), "drift_share and shared must lie in"),
        (dict(datasets=2), "several datasets need switch_every"),
        (dict(top_k=300, num_experts=256), "top_k 300 exceeds"),
    ],
)
def test_bad_specs_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        traces.TraceSpec("bad", **fields)
    with pytest.raises(ValueError, match="unknown trace 'nope'"):
        traces.get_spec("nope")
