"""Run vLLM (CPU) on a model with or without the omni passes, in a child process, and
report tokens, timings and the passes' worker-side status as JSON. Tests and benchmarks use
it so that each engine lives in its own process tree (vLLM's engine is spawned and needs a
__main__ guard).

    python -m omni_passes.testing.vllm_run --model DIR [--pass-config FILE] \
        --prompts-json '["a", "b"]' --max-tokens 16 [--repeats N] \
        [--phases-json '[{"apply": "p.json", "rounds": 2}, ...]']

Each phase optionally applies a placement in place in the running engine
(``omni_passes.vllm_control``), then generates ``rounds`` times; the worker's status (report,
placement, loads, rebalance events, dynamo's graph count) is taken after each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPILE_CONFIG = {"inductor_passes": {"post_grad_custom_post_pass": "omni_passes.vllm_post_grad_pass"}}
WORKER_EXTENSION = "omni_passes.vllm_control.OmniWorkerExtension"


def child_env(pass_config: str | None, cache_dir: str, compile_cache: bool = False) -> dict[str, str]:
    """Environment of an engine run: small KV cache, the pass config if any, and the compile
    caches in ``cache_dir``: a fresh folder per run by default (a cache hit would make a
    comparison compile nothing); ``compile_cache`` keeps vLLM's own cache on there too, so two
    runs given one folder share what the first compiled."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir) / "inductor")
    env["VLLM_CACHE_ROOT"] = str(Path(cache_dir) / "vllm")
    if compile_cache:
        env.pop("VLLM_DISABLE_COMPILE_CACHE", None)
        # vllm-cpu 0.32 saves an AOT-compiled function it then fails to load ("'function' object
        # has no attribute 'finalize_loading'", passes off too) and recompiles; with AOT off,
        # Dynamo + Inductor's own caches load.
        env["VLLM_USE_AOT_COMPILE"] = "0"
    else:
        env["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    env.pop("OMNI_PASSES_CONFIG", None)
    if pass_config:
        env["OMNI_PASSES_CONFIG"] = str(pass_config)
    return env


def run_engine(model: str | Path, prompts: list[str], max_tokens: int, pass_config: str | None = None,
               repeats: int = 1, timeout: float = 600, max_num_seqs: int = 8, phases: list[dict] | None = None,
               cache_dir: str | Path | None = None) -> dict:
    """Start an engine in a child process; returns its JSON result (raises on failure with
    the child's stderr tail, which holds vLLM's error). ``cache_dir``: compile caches shared
    with other runs given the same folder (``child_env``); default: a fresh one."""
    with tempfile.TemporaryDirectory(prefix="omni-vllm-") as fresh:
        shared = cache_dir is not None
        cache_dir = str(cache_dir) if shared else fresh
        cmd = [sys.executable, "-m", "omni_passes.testing.vllm_run", "--model", str(model),
               "--prompts-json", json.dumps(prompts), "--max-tokens", str(max_tokens),
               "--repeats", str(repeats), "--max-num-seqs", str(max_num_seqs)]
        if pass_config:
            cmd += ["--pass-config", str(pass_config)]
        if phases:
            cmd += ["--phases-json", json.dumps(phases)]
        proc = subprocess.run(cmd, env=child_env(pass_config, cache_dir, compile_cache=shared), capture_output=True,
                              text=True, timeout=timeout)
    if proc.returncode != 0:
        raise EngineFailed(proc.returncode, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


class EngineFailed(RuntimeError):
    def __init__(self, returncode: int, stderr: str):
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"vLLM run failed ({returncode}):\n{stderr[-4000:]}")


def engine_kwargs(model: str, pass_config: str | None, max_num_seqs: int) -> dict:
    kwargs = dict(model=model, dtype="float32", max_model_len=512, max_num_seqs=max_num_seqs, seed=0)
    if pass_config:
        kwargs["compilation_config"] = COMPILE_CONFIG
        kwargs["worker_extension_cls"] = WORKER_EXTENSION
    return kwargs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pass-config", default=None)
    parser.add_argument("--prompts-json", required=True)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="timed generate() rounds after the first")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--phases-json", default="[]", help="in-place placements and generate rounds after the first")
    args = parser.parse_args(argv)
    prompts = json.loads(args.prompts_json)

    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**engine_kwargs(args.model, args.pass_config, args.max_num_seqs))
    startup_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "startup_s": startup_s,
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "text": [o.outputs[0].text for o in outputs],
        "rounds": [],
        "phases": [],
    }
    for _ in range(args.repeats):
        begin = time.perf_counter()
        timed = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        generated = sum(len(o.outputs[0].token_ids) for o in timed)
        result["rounds"].append({"seconds": elapsed, "output_tokens": generated, "tokens_per_s": generated / elapsed})
    if args.pass_config:
        result["status"] = llm.collective_rpc("omni_status")[0]
    for phase in json.loads(args.phases_json):
        entry: dict = {"apply": phase.get("apply"), "token_ids": []}
        if phase.get("apply"):
            from omni_passes.placement.placement import Placement

            entry["applied"] = llm.collective_rpc("omni_apply_placement", args=(Placement.load(phase["apply"]).to_dict(),))[0]
        for _ in range(int(phase.get("rounds", 1))):
            out = llm.generate(phase.get("prompts", prompts), params, use_tqdm=False)
            entry["token_ids"].append([list(o.outputs[0].token_ids) for o in out])
        entry["status"] = llm.collective_rpc("omni_status")[0]
        result["phases"].append(entry)
    llm.shutdown() if hasattr(llm, "shutdown") else None
    del llm
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
