"""The verdict of a low-precision `bench graph` run: every variant checked again in float32.

In bf16 the check cannot tell an exact rewrite from a wrong one on the shapes people bench. On
the H100 (DeepSeek-V2-Lite dims, 4 layers, batch 16, 2026-12-07) the compile noise alone was
0.21-0.51 (max |compiled - eager| of the logits), the exact latent rewrite moved them by 0.39-0.49
against compiled (one token of 16 past the tolerance: a near-tied expert choice flipped), and
a *wrong* attention function, the dense model against its sink+recent mask, by 0.39-0.53: the
same size. In float32 the compile noise is ~1e-6 and a wrong window or table moves every token
(``tests/unit/test_check_rule.py``). So where the run's dtype is not float32 the verdict comes
from the same rule (``omni_passes.numerics``, peers as in ``check``) applied to float32 copies
of the model and of every variant, built and run once per context, not timed; the run's own
low-precision comparison is kept beside it as the variant's drift (what bf16 rounding and
routing flips do to the logits), with no verdict.

    run dtype float32   check = the run's check (nothing more to compile)
    run dtype bf16      check = the float32 check; drift = the bf16 comparison
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from omni_passes.bench.graph import check as checks
from omni_passes.bench.graph.cli import Settings
from omni_passes.bench.graph.model import DecodeSteps
from omni_passes.bench.graph.variants import MASKED_PEER, family

# (variant name, contexts, compile: model -> module); the model is a fresh float32 copy.
Planned = tuple[str, list[int], Callable[[Any], Any]]


def needed(s: Settings) -> bool:
    """Whether the run's own check is not the verdict (its dtype is not float32)."""
    return s.dtype != torch.float32


def float32_checks(s: Settings, step_ids: torch.Tensor, planned: list[Planned],
                   fresh_model: Callable[[torch.dtype], Any]) -> dict[str, dict[str, dict]]:
    """name -> context (str) -> the check of that variant in float32.

    ``planned`` holds the run's compiled variants, ``compiled`` (no omni pass) among them;
    ``step_ids`` the run's decode tokens; ``fresh_model(dtype)`` builds the run's model (same
    seed) in that dtype. The peers (``compiled``, and ``compiled+masked`` at every windowed
    context: the masked model compiled as ``compiled`` is) are computed here too, in float32."""
    compile_plain = next(fn for name, _, fn in planned if name == "compiled")
    steps = DecodeSteps(s.hf_config, step_ids, s.device, torch.float32)
    eager = fresh_model(torch.float32)
    references = checks.reference_logits(eager, steps, s.all_contexts, s.window if s.windowed else None, s.contexts)
    logits: dict[tuple[str, int], torch.Tensor] = {}
    if s.windowed:
        for context in s.contexts:
            logits[(MASKED_PEER, context)] = checks.masked_peer_logits(
                eager, compile_plain, steps, [context], s.window)[context]
    del eager
    results: dict[str, dict[str, dict]] = {}
    for name, contexts, compile_fn in planned:
        module = compile_fn(fresh_model(torch.float32))
        for context in contexts:
            logits[(family(name), context)] = steps.logits(module, context).float().cpu()
            results.setdefault(name, {})[str(context)] = checks.check_variant(
                name, context, logits, references, torch.float32)
        del module
        if s.device == "cuda":
            torch.cuda.empty_cache()
    return results


def as_drift(entry: dict[str, Any], dtype: torch.dtype) -> None:
    """A low-precision run's own checks become ``entry``'s drift: the same figures, no verdict."""
    drift = entry.pop("check_by_context", None)
    entry.pop("check", None)
    if drift is None:
        return
    for check in drift.values():
        check.pop("ok", None)
        check["dtype"] = str(dtype).replace("torch.", "")
    entry["drift_by_context"] = drift
    entry["drift"] = drift[max(drift, key=int)]


def set_verdict(entry: dict[str, Any], by_context: dict[str, dict]) -> None:
    """The float32 checks become ``entry``'s checks (``check``: the longest context's)."""
    entry["check_by_context"] = {c: dict(check, dtype="float32") for c, check in by_context.items()}
    entry["check"] = entry["check_by_context"][max(by_context, key=int)]
