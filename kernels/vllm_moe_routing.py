"""vLLM's DeepSeek router as pure torch: grouped top-k over softmax or sigmoid scores.

vLLM 0.26 builds a ``GroupedTopKRouter`` for every DeepSeek-V2/V3 MoE layer
(``use_grouped_topk=True``; ``FusedMoE(...)`` in ``fused_moe/layer.py``). Its routing, for
``logits [T, E]`` of the gate (in the gate's output dtype, bf16 unless the config asks for
fp32), is the Python function ``grouped_topk`` of ``fused_moe/router/grouped_topk_router.py``:

    s      = softmax(logits) | sigmoid(logits)                  (in the logits' dtype)
    choice = s + bias           if e_score_correction_bias      (bias is fp32: choice is fp32)
    group  = top-2 sum of choice per group   if bias,  else max of s per group
    keep the topk_group best groups; choose top_k experts among them by choice
    w      = s[chosen]          (the unbiased scores: the bias steers the choice only)
    w      = w / sum(w)         if renormalize
    w      = w * scale          if scale != 1
    return w.float(), ids.int()

``scale`` is the router's ``routed_scaling_factor``. For DeepSeek on CUDA it is 1.0: the model
asks for ``apply_routed_scale_to_output`` (everywhere but ROCm AITER), so the runner
multiplies the routed *output* by the factor after the MoE op
(``MoERunner._maybe_apply_routed_scale_to_output``; the ``mul(routed, 2.5)`` after
``vllm.moe_forward_shared`` in vLLM's CUDA graph). ``RouterSpec.output_scale`` keeps that
factor for references that compute the whole layer.

Where vLLM does not run this Python function:
* CUDA with a correction bias (DeepSeek-V3, ``topk_method="noaux_tc"``), ``num_expert_group
  <= 32``, ``top_k <= 32`` and ``VLLM_USE_FUSED_MOE_GROUPED_TOPK=1`` (the default) call the
  fused kernel ``vllm._custom_ops.grouped_topk``. Same rule, but: its sigmoid is
  ``0.5 * tanh(x / 2) + 0.5`` in fp32 rounded to the logits' dtype, and an equal score goes to
  the lower expert index. So ids can differ from this function where two scores tie or
  differ by an ulp (bf16 logits make that common), and weights by about an ulp.
  ``tie_break="lowest_index"`` gives that tie rule here; the fp32 rounding is not emulated.
  The omni op therefore calls the layer's own router on CUDA (``kernels.vllm_slot_moe``) and
  uses this module as the reference and the CPU path.
* ``num_experts <= num_expert_group`` or not divisible (never for DeepSeek) falls back to
  vLLM's non-grouped ``fused_topk``/``fused_topk_bias``; refused here.

Tie order: vLLM calls ``torch.topk(..., sorted=False)`` (``sorted=True`` under
``VLLM_BATCH_INVARIANT``). The default ``tie_break="torch"`` does the same, so on the same
device and dtype it returns the same ids *in the same column order* as vLLM's Python path; the
column order matters for bf16 output bits, since the fused experts sum the K columns in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

ScoringFunc = Literal["softmax", "sigmoid"]
TieBreak = Literal["torch", "lowest_index"]


@dataclass(frozen=True)
class RouterSpec:
    """The routing rule of one MoE layer, as vLLM's router holds it.

    Attributes:
        top_k: experts per token (K).
        num_expert_group, topk_group: group-limited routing (G groups, keep the best
            ``topk_group``); 1, 1 is plain top-k.
        scoring_func: ``"softmax"`` or ``"sigmoid"``.
        renormalize: divide the K weights by their sum (``norm_topk_prob``).
        routed_scaling_factor: the factor the *router* multiplies the weights by (1.0 when vLLM
            applies it to the output instead, as for DeepSeek on CUDA).
        output_scale: the factor the runner multiplies the routed output by after the op.
        sorted: ``torch.topk(sorted=...)`` as vLLM calls it (``VLLM_BATCH_INVARIANT``).
    """

    top_k: int
    num_expert_group: int = 1
    topk_group: int = 1
    scoring_func: ScoringFunc = "softmax"
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    output_scale: float = 1.0
    sorted: bool = False

    def __post_init__(self) -> None:
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"RouterSpec.scoring_func must be 'softmax' or 'sigmoid', got {self.scoring_func!r}")
        for key in ("top_k", "num_expert_group", "topk_group"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RouterSpec.{key} must be a positive integer, got {value!r}")
        if self.topk_group > self.num_expert_group:
            raise ValueError(f"RouterSpec.topk_group={self.topk_group} exceeds num_expert_group={self.num_expert_group}")

    @classmethod
    def from_hf_config(cls, config: Any, apply_routed_scale_to_output: bool = True) -> RouterSpec:
        """The spec vLLM's ``DeepseekV2MoE`` builds from a HF DeepSeek config (``n_group`` and
        ``topk_group`` default to 1, ``scoring_func`` to softmax, ``norm_topk_prob`` is
        ``renormalize``); the scale goes to the output unless ``apply_routed_scale_to_output``
        is False (ROCm AITER)."""
        scale = float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)
        return cls(
            top_k=int(config.num_experts_per_tok),
            num_expert_group=int(getattr(config, "n_group", 1) or 1),
            topk_group=int(getattr(config, "topk_group", 1) or 1),
            scoring_func=getattr(config, "scoring_func", "softmax"),
            renormalize=bool(config.norm_topk_prob),
            routed_scaling_factor=1.0 if apply_routed_scale_to_output else scale,
            output_scale=scale if apply_routed_scale_to_output else 1.0,
        )

    @classmethod
    def from_vllm_runner(cls, runner: Any, batch_invariant: bool = False) -> RouterSpec:
        """The spec of a vLLM ``MoERunner`` (its ``router`` must be a ``GroupedTopKRouter``)."""
        router = runner.router
        missing = [k for k in ("top_k", "num_expert_group", "topk_group", "scoring_func", "renormalize",
                               "routed_scaling_factor") if not hasattr(router, k)]
        if missing:
            raise TypeError(f"{type(router).__name__} is not a grouped top-k router (no {', '.join(missing)})")
        return cls(
            top_k=int(router.top_k), num_expert_group=int(router.num_expert_group), topk_group=int(router.topk_group),
            scoring_func=router.scoring_func, renormalize=bool(router.renormalize),
            routed_scaling_factor=float(router.routed_scaling_factor),
            output_scale=float(getattr(runner, "routed_scaling_factor", 1.0)), sorted=batch_invariant,
        )


def routing_scores(logits: torch.Tensor, scoring_func: ScoringFunc) -> torch.Tensor:
    """``[T, E]`` scores in the logits' dtype: softmax over experts, or elementwise sigmoid."""
    if scoring_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"unsupported scoring function {scoring_func!r} (softmax or sigmoid)")


def top_k(values: torch.Tensor, k: int, sorted: bool = False, tie_break: TieBreak = "torch") -> torch.Tensor:
    """Indices ``[T, k]`` of the k largest entries per row.

    ``"torch"``: ``torch.topk(values, k, sorted=sorted)`` as vLLM calls it (which of two equal
    values wins, and the column order when unsorted, are torch's). ``"lowest_index"``: the
    k best in descending order, an equal value going to the lower index (the fused CUDA
    kernel's rule), from a stable descending sort.
    """
    if tie_break == "torch":
        return torch.topk(values, k=k, dim=-1, sorted=sorted)[1]
    if tie_break == "lowest_index":
        return torch.sort(values, dim=-1, descending=True, stable=True)[1][..., :k]
    raise ValueError(f"tie_break must be 'torch' or 'lowest_index', got {tie_break!r}")


def grouped_topk(
    logits: torch.Tensor,
    spec: RouterSpec,
    e_score_correction_bias: torch.Tensor | None = None,
    tie_break: TieBreak = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's grouped top-k routing (module docstring), op for op.

    Args:
        logits: ``[T, E]`` router logits (the gate's output, any float dtype).
        spec: the layer's routing rule.
        e_score_correction_bias: ``[E]`` (fp32 in vLLM) added to the scores for the choice only.
        tie_break: see ``top_k``.

    Returns:
        topk_weights: float32 ``[T, K]``; topk_ids: int32 ``[T, K]`` logical expert ids.
    """
    if logits.dim() != 2:
        raise ValueError(f"grouped_topk: logits must be [T, E], got shape {tuple(logits.shape)}")
    num_tokens, num_experts = logits.shape
    groups = spec.num_expert_group
    if num_experts <= groups or num_experts % groups:
        raise ValueError(
            f"grouped_topk: {num_experts} experts cannot form {groups} groups (vLLM falls back to "
            "non-grouped fused_topk there, which this reference does not reproduce)"
        )
    if spec.top_k > spec.topk_group * (num_experts // groups):
        raise ValueError(f"grouped_topk: top_k={spec.top_k} exceeds the {spec.topk_group} kept groups' experts")
    if e_score_correction_bias is not None and e_score_correction_bias.shape != (num_experts,):
        raise ValueError(f"grouped_topk: bias must be [{num_experts}], got {tuple(e_score_correction_bias.shape)}")

    scores = routing_scores(logits, spec.scoring_func)
    original = scores
    if e_score_correction_bias is not None:
        scores = scores + e_score_correction_bias.unsqueeze(0)
        group_scores = scores.view(num_tokens, groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
    else:
        group_scores = scores.view(num_tokens, groups, -1).max(dim=-1).values
    group_idx = top_k(group_scores, spec.topk_group, spec.sorted, tie_break)
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(num_tokens, groups, num_experts // groups).reshape(num_tokens, -1)
    candidates = scores.masked_fill(~score_mask.bool(), float("-inf"))
    ids = top_k(candidates, spec.top_k, spec.sorted, tie_break)
    weights = original.gather(1, ids)
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return weights.to(torch.float32), ids.to(torch.int32)
