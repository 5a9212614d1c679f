"""kernels.vllm_moe_routing: vLLM's DeepSeek router as pure torch.

Hand-computed cases, then bit-for-bit against vLLM's own Python ``grouped_topk`` (the installed
vLLM; the same function as 0.26 on every path but the fused CUDA kernel), and against the
project's transformers-style DeepSeek-V3 routing.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kernels.vllm_moe_routing import RouterSpec, grouped_topk, top_k


def logit(p: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(x / (1 - x)) for x in p]], dtype=torch.float64)


def test_softmax_plain_topk_renormalised():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64))  # softmax: .1 .2 .3 .4
    weights, ids = grouped_topk(logits, RouterSpec(top_k=2, scoring_func="softmax", sorted=True))
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.4 / 0.7, 0.3 / 0.7]]), rtol=0, atol=1e-7)


def test_softmax_without_renormalisation_keeps_probabilities_and_scales_weights():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64))
    spec = RouterSpec(top_k=2, renormalize=False, routed_scaling_factor=2.5, sorted=True)
    weights, ids = grouped_topk(logits, spec)
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.75]]), rtol=0, atol=1e-7)


# Sigmoid scores p, 4 groups of 2 experts, keep 2 groups, 2 experts.
P = [0.9, 0.15, 0.5, 0.45, 0.6, 0.55, 0.2, 0.1]
V3 = RouterSpec(top_k=2, num_expert_group=4, topk_group=2, scoring_func="sigmoid", sorted=True)


def test_sigmoid_groups_without_bias_pick_by_group_max():
    # group maxima .9 .5 .6 .2 -> groups {0, 2}; experts there: .9 (0) and .6 (4)
    weights, ids = grouped_topk(logit(P), V3)
    assert ids.tolist() == [[0, 4]]
    torch.testing.assert_close(weights, torch.tensor([[0.6, 0.4]]), rtol=0, atol=1e-6)


def test_bias_steers_the_choice_but_not_the_weights():
    # unbiased top-2 group sums 1.05 .95 1.15 .30 keep {2, 0}; +0.3 on expert 3 lifts group 1 to
    # 1.25, so groups {1, 2} win and the biased choice is 3 (.75) and 4 (.6); the weights are
    # the unbiased .45 and .6, renormalised.
    bias = torch.zeros(8, dtype=torch.float64)
    bias[3] = 0.3
    weights, ids = grouped_topk(logit(P), V3, bias)
    assert ids.tolist() == [[3, 4]]
    torch.testing.assert_close(weights, torch.tensor([[0.45 / 1.05, 0.6 / 1.05]]), rtol=0, atol=1e-6)
    # without the bias the same logits route elsewhere
    assert grouped_topk(logit(P), V3)[1].tolist() == [[0, 4]]


def test_lowest_index_tie_break_takes_the_lower_expert():
    logits = torch.zeros(3, 8)
    spec = RouterSpec(top_k=3, num_expert_group=4, topk_group=2, scoring_func="sigmoid")
    weights, ids = grouped_topk(logits, spec, torch.zeros(8), tie_break="lowest_index")
    assert ids.tolist() == [[0, 1, 2]] * 3  # all equal: groups 0 and 1, then experts 0, 1, 2
    torch.testing.assert_close(weights, torch.full((3, 3), 1 / 3))
    assert top_k(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 2, tie_break="lowest_index").tolist() == [[1, 2]]


def test_spec_from_hf_config_moves_the_scale_to_the_output_like_vllm_on_cuda():
    config = SimpleNamespace(num_experts_per_tok=8, n_group=8, topk_group=4, scoring_func="sigmoid",
                             norm_topk_prob=True, routed_scaling_factor=2.5)
    spec = RouterSpec.from_hf_config(config)
    assert (spec.routed_scaling_factor, spec.output_scale) == (1.0, 2.5)
    assert (spec.top_k, spec.num_expert_group, spec.topk_group, spec.scoring_func) == (8, 8, 4, "sigmoid")
    aiter = RouterSpec.from_hf_config(config, apply_routed_scale_to_output=False)
    assert (aiter.routed_scaling_factor, aiter.output_scale) == (2.5, 1.0)
    lite = RouterSpec.from_hf_config(SimpleNamespace(num_experts_per_tok=6, norm_topk_prob=False))
    assert (lite.num_expert_group, lite.topk_group, lite.scoring_func, lite.renormalize) == (1, 1, "softmax", False)


def test_spec_from_a_vllm_runner_reads_its_router():
    router = SimpleNamespace(top_k=6, num_expert_group=1, topk_group=1, scoring_func="softmax", renormalize=False,
                             routed_scaling_factor=1.0)
    spec = RouterSpec.from_vllm_runner(SimpleNamespace(router=router, routed_scaling_factor=1.0))
    assert spec == RouterSpec(top_k=6, renormalize=False)
    with pytest.raises(TypeError, match="not a grouped top-k router"):
        RouterSpec.from_vllm_runner(SimpleNamespace(router=SimpleNamespace(top_k=2)))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="cannot form 8 groups"):
        grouped_topk(torch.zeros(2, 8), RouterSpec(top_k=2, num_expert_group=8, topk_group=2))
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        grouped_topk(torch.zeros(2, 8), V3, torch.zeros(4))
    with pytest.raises(ValueError, match="scoring_func"):
        RouterSpec(top_k=2, scoring_func="sqrtsoftplus")
    with pytest.raises(ValueError, match="topk_group=3 exceeds"):
        RouterSpec(top_k=2, num_expert_group=2, topk_group=3)
    with pytest.raises(ValueError, match="exceeds the 1 kept groups"):
        grouped_topk(torch.zeros(2, 8), RouterSpec(top_k=3, num_expert_group=4, topk_group=1))


CASES = [
    # (experts, spec, bias)
    (64, RouterSpec(top_k=6, scoring_func="softmax", renormalize=False), False),  # DeepSeek-V2-Lite
    (160, RouterSpec(top_k=6, num_expert_group=8, topk_group=3, scoring_func="softmax", renormalize=False), False),
    (256, RouterSpec(top_k=8, num_expert_group=8, topk_group=4, scoring_func="sigmoid"), True),  # V3
    (16, RouterSpec(top_k=4, num_expert_group=4, topk_group=2, scoring_func="sigmoid", routed_scaling_factor=2.5),
     True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts,spec,with_bias", CASES)
def test_equals_vllms_own_grouped_topk_bit_for_bit(experts, spec, with_bias, dtype):
    router = pytest.importorskip("vllm.model_executor.layers.fused_moe.router.grouped_topk_router")
    vllm_grouped_topk = getattr(router.grouped_topk, "__wrapped__", router.grouped_topk)  # the function, uncompiled
    gen = torch.Generator().manual_seed(experts)
    logits = torch.randn(33, experts, generator=gen).to(dtype)
    bias = (torch.randn(experts, generator=gen) * 0.05) if with_bias else None
    expected = vllm_grouped_topk(
        hidden_states=torch.empty(33, 1), gating_output=logits, topk=spec.top_k, renormalize=spec.renormalize,
        num_expert_group=spec.num_expert_group, topk_group=spec.topk_group, scoring_func=spec.scoring_func,
        routed_scaling_factor=spec.routed_scaling_factor, e_score_correction_bias=bias,
    )
    weights, ids = grouped_topk(logits, spec, bias)
    assert torch.equal(ids, expected[1])
    assert torch.equal(weights, expected[0])


def test_agrees_with_the_transformers_style_deepseek_v3_routing():
    from omni_passes.ep.routing import deepseek_topk
    from omni_passes.ep.weights import MoESpec

    moe = MoESpec(hidden_size=32, moe_intermediate_size=16, num_experts=16, top_k=4, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5)
    gen = torch.Generator().manual_seed(3)
    hidden, gate, bias = torch.randn(50, 32, generator=gen), torch.randn(16, 32, generator=gen), torch.randn(16, generator=gen) * 0.1
    ref_weights, ref_ids = deepseek_topk(hidden, gate, bias, moe)
    spec = RouterSpec(top_k=4, num_expert_group=4, topk_group=2, scoring_func="sigmoid", output_scale=2.5)
    weights, ids = grouped_topk(torch.nn.functional.linear(hidden, gate), spec, bias)
    # same experts per token (column order is torch.topk's, unsorted, in both)
    assert torch.equal(ids.long().sort(dim=-1).values, ref_ids.sort(dim=-1).values)
    order_ref, order = ref_ids.argsort(dim=-1), ids.long().argsort(dim=-1)
    # transformers scales the weights; vLLM on CUDA scales the routed output by the same factor
    torch.testing.assert_close(weights.gather(1, order) * spec.output_scale, ref_weights.gather(1, order_ref))
