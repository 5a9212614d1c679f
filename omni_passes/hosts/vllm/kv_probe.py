"""Run vLLM (CPU) with its engine core in this process and watch the KV cache manager per step.

Tests and ``omni-passes bench vllm`` (KV part) need what vLLM's scheduler knows: the KV cache
groups and their spec/manager types, the pool size, vLLM's own capacity figures, and, step by
step, how many requests run, wait, were preempted, and how many blocks each request holds in
each group. With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine core (scheduler and worker)
lives in the caller's process, so all of that is read directly; ``run`` drives generation with
``LLMEngine.step()``.

On CPU the engine runs in float32 with the omni post-grad pass compiled in (the sparse-attention
pass rewrites the attention op there); on CUDA in bfloat16 without it (the compressed layers'
attention is changed in the layer, ``kv_cuda``), chunked prefill on as vLLM has it.

As a command (one JSON document on stdout; vLLM's log on stderr)::

    python -m omni_passes.hosts.vllm.kv_probe --model DIR [--pass-config FILE] \
        --prompts-json '["a", {"prompt_token_ids": [5, 6], "max_tokens": 9}]' --max-tokens 64 \
        [--max-model-len 512] [--num-gpu-blocks-override N] [--max-num-seqs 8] [--trace] \
        [--logprobs 2] [--gpu-memory-utilization 0.3] [--cudagraph-capture-sizes 1,2,4,8] \
        [--no-prefix-caching] [--enforce-eager]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

COMPILE_CONFIG = {"inductor_passes": {"post_grad_custom_post_pass": "omni_passes.vllm_post_grad_pass"}}


def start(model: str, pass_config: str | None = None, max_model_len: int = 512, max_num_seqs: int = 8,
          num_gpu_blocks_override: int | None = None, chunked_prefill_tokens: int | None = None, **kwargs: Any):
    """An ``LLM`` whose engine core runs in this process (set env before vLLM reads it).

    ``chunked_prefill_tokens``: the token budget per step, so that long prompts are split into
    chunks with cached context. vLLM's CPU platform turns chunked prefill off for MLA (its
    reference CPU MLA backend); it is turned back on here for tests of the cached-context path.
    On CUDA chunked prefill is on already: this sets ``max_num_batched_tokens``.
    ``kwargs`` go to ``LLM`` (and override the defaults: float32 on CPU, bfloat16 on CUDA).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.pop("OMNI_PASSES_CONFIG", None)
    if pass_config:
        os.environ["OMNI_PASSES_CONFIG"] = str(pass_config)
    from vllm.platforms import current_platform

    cuda = current_platform.is_cuda()
    if chunked_prefill_tokens:
        if cuda:
            kwargs.setdefault("max_num_batched_tokens", chunked_prefill_tokens)
        else:
            _force_chunked_prefill(chunked_prefill_tokens)
    from vllm import LLM

    args = {"model": model, "dtype": "bfloat16" if cuda else "float32", "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs, "seed": 0, "num_gpu_blocks_override": num_gpu_blocks_override}
    if pass_config and not cuda:
        args["compilation_config"] = COMPILE_CONFIG
    args.update(kwargs)
    return LLM(**args)


def _force_chunked_prefill(tokens: int) -> None:
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        original(cls, vllm_config)
        if vllm_config.model_config is not None and vllm_config.model_config.use_mla:
            vllm_config.scheduler_config.enable_chunked_prefill = True
            vllm_config.scheduler_config.max_num_batched_tokens = tokens

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


def _engine_core(llm: Any) -> Any:
    client = llm.llm_engine.engine_core
    if not hasattr(client, "engine_core"):
        raise RuntimeError("the vLLM engine core is not in this process (set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
                           "before creating the LLM, as start() does)")
    return client.engine_core


def kv_layout(llm: Any) -> dict:
    """KV cache groups, pool size and vLLM's capacity figures of a running engine."""
    core = _engine_core(llm)
    scheduler = core.scheduler
    config = scheduler.kv_cache_config
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    cache = llm.llm_engine.vllm_config.cache_config
    groups = []
    for group, manager in zip(config.kv_cache_groups, managers):
        spec = group.kv_cache_spec
        groups.append({
            "layers": list(group.layer_names),
            "spec": type(spec).__name__,
            "manager": type(manager).__name__,
            "block_size": spec.block_size,
            "page_size_bytes": spec.page_size_bytes,
            "max_blocks_per_request": -(-spec.max_memory_usage_bytes(llm.llm_engine.vllm_config) // spec.page_size_bytes),
            "sink": getattr(spec, "sink", None),
            "recent": getattr(spec, "recent", None),
        })
    vllm_config = llm.llm_engine.vllm_config
    tokens = getattr(cache, "kv_cache_size_tokens", None)
    concurrency = getattr(cache, "kv_cache_max_concurrency", None)
    if tokens is None or concurrency is None:  # set on the config only by some engine clients
        figures = capacity_at(llm, vllm_config.model_config.max_model_len)
        tokens, concurrency = figures["tokens"], figures["max_concurrency"]
    return {
        "groups": groups,
        "num_blocks": config.num_blocks,
        "block_size": groups[0]["block_size"] if groups else None,
        # Groups overlay one backing allocation (a block id belongs to one group at a time).
        "kv_cache_bytes": max(t.size for t in config.kv_cache_tensors),
        "kv_cache_size_tokens": tokens,
        "max_concurrency": concurrency,
        "max_model_len": vllm_config.model_config.max_model_len,
        "enable_prefix_caching": bool(cache.enable_prefix_caching),
        "enable_chunked_prefill": bool(vllm_config.scheduler_config.enable_chunked_prefill),
        "async_scheduling": bool(getattr(vllm_config.scheduler_config, "async_scheduling", False)),
    }


def capacity_at(llm: Any, max_model_len: int) -> dict:
    """vLLM's own capacity figures (``get_kv_cache_capacity``, what its start-up log prints) for
    this engine's KV cache, for requests of ``max_model_len`` tokens."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    vllm_config = llm.llm_engine.vllm_config
    model_config = vllm_config.model_config
    kv_cache_config = _engine_core(llm).scheduler.kv_cache_config
    before = model_config.max_model_len
    object.__setattr__(model_config, "max_model_len", max_model_len)  # past any assignment validation
    try:
        tokens, concurrency = get_kv_cache_capacity(vllm_config, kv_cache_config)
    finally:
        object.__setattr__(model_config, "max_model_len", before)
    return {"max_model_len": max_model_len, "tokens": int(tokens), "max_concurrency": float(concurrency)}


def _snapshot(core: Any, managers: Any) -> dict:
    scheduler = core.scheduler
    running = [r.request_id for r in scheduler.running]
    live = {rid: [sum(not b.is_null for b in m.req_to_blocks.get(rid, ())) for m in managers] for rid in running}
    return {
        "running": len(running),
        "waiting": len(scheduler.waiting),
        "free_blocks": scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
        "live_blocks": live,
        "computed_tokens": {r.request_id: r.num_computed_tokens for r in scheduler.running},
        "preemptions": {rid: r.num_preemptions for rid, r in scheduler.requests.items() if r.num_preemptions},
    }


def run(llm: Any, prompts: list[Any], max_tokens: int | list[int], trace: bool = True, tag: str = "r",
        logprobs: int | None = None) -> dict:
    """Greedy generation of every prompt at once (text, or ``{"prompt_token_ids": [...]}``, which
    may carry its own ``"max_tokens"``), stepping the engine; returns tokens, timings and
    (``trace``) one scheduler snapshot per step. Request ids are ``tag`` + index (use a new tag
    for every call on one engine). ``logprobs``: also the top ``logprobs`` log-probabilities of
    every generated position (``top_logprobs``, descending)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    core = _engine_core(llm)
    managers = core.scheduler.kv_cache_manager.coordinator.single_type_managers
    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    ids = [f"{tag}{i}" for i in range(len(prompts))]
    for rid, prompt, length in zip(ids, prompts, lengths):
        if isinstance(prompt, dict) and "max_tokens" in prompt:
            prompt = dict(prompt)
            length = prompt.pop("max_tokens")
        params = SamplingParams(temperature=0.0, max_tokens=length, ignore_eos=True, logprobs=logprobs,
                                detokenize=not isinstance(prompt, dict))
        engine.add_request(rid, prompt, params)
    outputs: dict[str, Any] = {}
    steps: list[dict] = []
    preemptions: dict[str, int] = {}
    begin, cpu_begin = time.perf_counter(), _cpu_seconds()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        snap = _snapshot(core, managers)
        for rid, count in snap["preemptions"].items():
            preemptions[rid] = max(preemptions.get(rid, 0), count)
        if trace:
            snap["t"] = time.perf_counter() - begin
            steps.append(snap)
    elapsed, cpu = time.perf_counter() - begin, _cpu_seconds() - cpu_begin
    done = [outputs[rid] for rid in ids]
    generated = sum(len(o.outputs[0].token_ids) for o in done)
    result = {
        "prompt_token_ids": [list(o.prompt_token_ids) for o in done],
        "token_ids": [list(o.outputs[0].token_ids) for o in done],
        "seconds": elapsed,
        "output_tokens": generated,
        "tokens_per_s": generated / elapsed,
        # CPU seconds of this process (all its threads): the work done, less sensitive than wall
        # time to other jobs sharing the machine.
        "cpu_seconds": cpu,
        "tokens_per_cpu_s": generated / cpu,
        "preemptions": sum(preemptions.values()),
        "max_running": max((s["running"] for s in steps), default=None),
        "steps": steps,
    }
    if logprobs:
        result["top_logprobs"] = [[sorted((lp.logprob for lp in position.values()), reverse=True)[:logprobs]
                                   for position in o.outputs[0].logprobs] for o in done]
    return result


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pass-config")
    parser.add_argument("--prompts-json", required=True)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--num-gpu-blocks-override", type=int)
    parser.add_argument("--enable-prefix-caching", action="store_true", help="ask vLLM for prefix caching")
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off (CUDA's default is on)")
    parser.add_argument("--chunked-prefill-tokens", type=int,
                        help="per-step token budget, so long prompts are prefilled in chunks (tests)")
    parser.add_argument("--trace", action="store_true", help="include one scheduler snapshot per step")
    parser.add_argument("--logprobs", type=int, help="also report the top-N log-probabilities per generated token")
    parser.add_argument("--dtype", help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--block-size", type=int, help="KV cache block size (vLLM's --block-size)")
    parser.add_argument("--gpu-memory-utilization", type=float, help="CUDA: vLLM's gpu_memory_utilization")
    parser.add_argument("--cudagraph-capture-sizes", help="CUDA: comma list of batch sizes to capture")
    parser.add_argument("--enforce-eager", action="store_true", help="no compile, no CUDA graphs")
    parser.add_argument("--attention-backend", help="CUDA: vLLM's attention backend for the dense layers, e.g. TRITON_MLA")
    args = parser.parse_args(argv)
    extra: dict[str, Any] = {}
    if args.enable_prefix_caching or args.no_prefix_caching:
        extra["enable_prefix_caching"] = bool(args.enable_prefix_caching)
    for key in ("dtype", "block_size", "gpu_memory_utilization", "attention_backend"):
        if getattr(args, key) is not None:
            extra[key] = getattr(args, key)
    if args.cudagraph_capture_sizes:
        extra["compilation_config"] = {"cudagraph_capture_sizes": [int(x) for x in args.cudagraph_capture_sizes.split(",")]}
    if args.enforce_eager:
        extra["enforce_eager"] = True
    start_s = time.perf_counter()
    llm = start(args.model, args.pass_config, args.max_model_len, args.max_num_seqs, args.num_gpu_blocks_override,
                args.chunked_prefill_tokens, **extra)
    result = {"startup_s": time.perf_counter() - start_s, "layout": kv_layout(llm)}
    result.update(run(llm, json.loads(args.prompts_json), args.max_tokens, trace=args.trace, logprobs=args.logprobs))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
