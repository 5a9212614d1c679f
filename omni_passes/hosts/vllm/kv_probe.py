"""Run vLLM (CPU) with its engine core in this process and watch the KV cache manager per step.

Tests and ``omni-passes bench vllm`` (KV part) need what vLLM's scheduler knows: the KV cache
groups and their spec/manager types, the pool size, vLLM's own capacity figures, and, step by
step, how many requests run, wait, were preempted, and how many blocks each request holds in
each group. With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine core (scheduler and worker)
lives in the caller's process, so all of that is read directly; ``run`` drives generation with
``LLMEngine.step()``.

As a command (one JSON document on stdout; vLLM's log on stderr)::

    python -m omni_passes.hosts.vllm.kv_probe --model DIR [--pass-config FILE] \
        --prompts-json '["a", "b"]' --max-tokens 64 [--max-model-len 512] \
        [--num-gpu-blocks-override N] [--max-num-seqs 8] [--trace]
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

    ``chunked_prefill_tokens``: turn chunked prefill back on for MLA with this token budget per
    step. vLLM's CPU platform turns it off for MLA (its reference CPU MLA backend); platforms
    that serve MLA with chunked prefill (AMX CPUs, GPUs) split long prompts like this. For tests
    of the cached-context path only.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if chunked_prefill_tokens:
        _force_chunked_prefill(chunked_prefill_tokens)
    os.environ.pop("OMNI_PASSES_CONFIG", None)
    if pass_config:
        os.environ["OMNI_PASSES_CONFIG"] = str(pass_config)
    from vllm import LLM

    args = dict(model=model, dtype="float32", max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=0,
                num_gpu_blocks_override=num_gpu_blocks_override, **kwargs)
    if pass_config:
        args["compilation_config"] = COMPILE_CONFIG
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
    return {
        "groups": groups,
        "num_blocks": config.num_blocks,
        # Groups overlay one backing allocation (a block id belongs to one group at a time).
        "kv_cache_bytes": max(t.size for t in config.kv_cache_tensors),
        "kv_cache_size_tokens": cache.kv_cache_size_tokens,
        "max_concurrency": cache.kv_cache_max_concurrency,
        "max_model_len": llm.llm_engine.vllm_config.model_config.max_model_len,
        "enable_prefix_caching": bool(cache.enable_prefix_caching),
        "enable_chunked_prefill": bool(llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill),
    }


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


def run(llm: Any, prompts: list[Any], max_tokens: int, trace: bool = True, tag: str = "r") -> dict:
    """Greedy generation of every prompt at once (text, or ``{"prompt_token_ids": [...]}``),
    stepping the engine; returns tokens, timings and (``trace``) one scheduler snapshot per step.
    Request ids are ``tag`` + index (use a new tag for every call on one engine)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    core = _engine_core(llm)
    managers = core.scheduler.kv_cache_manager.coordinator.single_type_managers
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"{tag}{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
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
    return {
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
    parser.add_argument("--chunked-prefill-tokens", type=int,
                        help="turn chunked prefill back on for MLA with this per-step token budget (tests)")
    parser.add_argument("--trace", action="store_true", help="include one scheduler snapshot per step")
    args = parser.parse_args(argv)
    extra = {"enable_prefix_caching": True} if args.enable_prefix_caching else {}
    start_s = time.perf_counter()
    llm = start(args.model, args.pass_config, args.max_model_len, args.max_num_seqs, args.num_gpu_blocks_override,
                args.chunked_prefill_tokens, **extra)
    result = {"startup_s": time.perf_counter() - start_s, "layout": kv_layout(llm)}
    result.update(run(llm, json.loads(args.prompts_json), args.max_tokens, trace=args.trace))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
