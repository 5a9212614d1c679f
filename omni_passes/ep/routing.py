"""DeepSeek-V3 routing (sigmoid scores, bias for the choice only, group-limited top-k).

Written to compute what transformers' ``DeepseekV3TopkRouter`` computes, op for op (float32
logits; the bias steers which experts are chosen, not their weights; groups scored by the sum
of their two best biased scores; weights renormalised and scaled), so an expert-parallel layer
chooses the same experts as the single-device reference for the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_passes.ep.weights import MoESpec


def deepseek_topk(
    hidden: torch.Tensor, router: torch.Tensor, bias: torch.Tensor, spec: MoESpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts.

    Args:
        hidden: ``[T, H]`` token states (any float dtype).
        router: ``[E, H]`` gate weight; bias: ``[E]`` float32 score correction.

    Returns:
        weights: float32 ``[T, K]`` routing weights; ids: int64 ``[T, K]`` logical experts.
    """
    logits = F.linear(hidden.float(), router.float())
    scores = logits.sigmoid()
    choice = scores + bias
    if spec.n_group > 1:
        per_group = spec.num_experts // spec.n_group
        group_scores = choice.view(-1, spec.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        best_groups = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, best_groups, 1)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, spec.n_group, per_group).reshape(-1, spec.num_experts)
        choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=spec.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * spec.routed_scaling_factor, ids
