"""The check rule: does a rewrite add error beyond what compiling the graph already adds?

Three runs on the same weights and inputs:

    eager                     the model as written (or its masked reference for sparse attention)
    compiled                  the same compile pipeline with no omni pass
    rewritten                 the same compile pipeline with the passes

    compile_noise = max |compiled  - eager|      the compiler's own reordering and fusion
    pass_error    = max |rewritten - compiled|   what the passes change
    tolerance     = compile_noise + eps(dtype) * max |compiled|
    ok            = pass_error <= tolerance

``compiled`` must compute the same function as ``rewritten`` in the same numerics class (both
compiled): a compiled rewrite against an *eager* model crosses the compile boundary, whose
routing flips (below) then land on the pass error instead of the noise. Where a run compiled
more than one function of the same model on the same inputs (a benchmark's dense and masked
models), each (compiled, eager) pair is a sample of the same compile noise; ``more_noise``
passes the others, and the largest is the noise.

Why not one fixed tolerance against eager: in bf16 a compiled graph alone moves the logits of
random models by 0.08 (a small DeepSeek-V3) to 2.1 (V2-Lite dimensions) on CUDA, because a
reordered sum flips near-tied top-k choices and the difference grows layer by layer. An exact
rewrite also changes what the compiler fuses, so its honest bound is the compile noise itself
plus one unit in the last place of the output dtype at the output's scale. A rewrite that
routes tokens to the wrong expert adds far more than that. The flip side, stated in every
result: where compile noise is large the check cannot see errors smaller than it, and fp32
(where compile noise is ~1e-7) is the exactness check.

Whether compiling flips a token is a coin toss per input batch (a 4-layer model with V2-Lite's
attention and experts in bf16 on CPU, 6 batches of 8 tokens: max |compiled - eager| 0.03-0.05
in 2, 0.15-0.23 in 4, while the median token moved 0.03 in all 6), and a rewrite that reorders
sums tosses its own coin. One sample of the noise can miss a flip that the pass error shows;
more samples (``more_noise``) make that rarer, and fp32 settles it.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

RULE = ("ok = pass_error <= tolerance = compile_noise + eps(dtype) * max|compiled|, compile_noise = max|compiled - eager| "
        "(the largest over the run's compiled/eager pairs of the model at these inputs)")
# One unit in the last place, relative; fp32's is floored at 1e-5 (its accumulations differ
# by that much across fusions of large reductions; compile noise is usually below it).
RELATIVE_EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float32; inf when the shapes differ or a NaN/inf stands where the other
    tensor holds something else (NaN where both are NaN counts as equal)."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach().float(), b.detach().float()
    same = (a == b) | (a.isnan() & b.isnan())
    diff = (a - b).abs().masked_fill(same, 0.0).nan_to_num(nan=float("inf"), posinf=float("inf"))
    return float(diff.max()) if diff.numel() else 0.0


def output_scale(output: torch.Tensor) -> float:
    """max |output| over its finite values (0 for an empty tensor)."""
    return float(output.detach().float().nan_to_num(0.0, 0.0, 0.0).abs().max()) if output.numel() else 0.0


def bound(compile_noise: float, scale: float, dtype: torch.dtype) -> float:
    """The most error a rewrite may add: the compile noise plus one relative unit of ``dtype``
    at the output's scale."""
    if dtype not in RELATIVE_EPS:
        raise ValueError(f"check rule: no rule for dtype {dtype}; known: {', '.join(map(str, RELATIVE_EPS))}")
    return compile_noise + RELATIVE_EPS[dtype] * scale


def check_rewrite(rewritten: torch.Tensor, compiled: torch.Tensor, eager: torch.Tensor,
                  dtype: torch.dtype, more_noise: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()) -> dict[str, Any]:
    """The check of one output. ``dtype``: the precision the model ran in. ``more_noise``:
    other (compiled, eager) output pairs of the same model on the same inputs (another function
    of it compiled the same way); the noise is the largest difference of any pair.

    Returns ``{"max_abs_diff", "ok", "tolerance", "pass_error", "compile_noise", "vs_eager",
    "output_scale", "rule"}`` (and ``"compile_noise_samples"`` with ``more_noise``);
    ``max_abs_diff`` is the pass error, the quantity ``ok`` is decided on."""
    pass_error = max_abs_diff(rewritten, compiled)
    samples = [max_abs_diff(compiled, eager)] + [max_abs_diff(c, e) for c, e in more_noise]
    compile_noise = max(samples)
    scale = output_scale(compiled)
    tolerance = bound(compile_noise, scale, dtype)
    return {
        "max_abs_diff": pass_error,
        "ok": pass_error <= tolerance,
        "tolerance": tolerance,
        "pass_error": pass_error,
        "compile_noise": compile_noise,
        "vs_eager": max_abs_diff(rewritten, eager),
        "output_scale": scale,
        "rule": RULE,
        **({"compile_noise_samples": samples} if len(samples) > 1 else {}),
    }
