"""`omni-passes bench vllm --kv --device cuda`: sink+recent KV on vLLM CUDA, dense vs compressed.

DeepSeek-V2-Lite's full configuration (27 layers, 64 experts top-6, MLA 512 + 64) with
``load_format="dummy"`` (random weights, nothing downloaded), bf16, in vLLM 0.26 with CUDA graphs.
Two engines, one after the other, each in its own process with its engine core in-process
(``omni_passes.hosts.vllm.kv_probe``), at the same ``gpu_memory_utilization`` (by default the
value that leaves about 16 GiB of KV cache on this GPU, so the run's prefill work, and its time,
is about the same on an H100 and an H200; dense then runs 16 requests of 32k tokens at its KV
limit):

* **dense**: vLLM as it is;
* **compressed**: ``sparse_attention`` on half the layers (the odd ones, 13 of 27; sink 128,
  recent 384 by default): their KV blocks outside the window are freed and they decode with the
  paged sink+recent kernel (``omni_passes.hosts.vllm.kv_cuda``).

Stages, in priority order (a time budget drops the last ones for both engines alike):

    capacity  vLLM's own log line ("Maximum concurrency for L tokens per request") and its
              function for 32k-token requests (``get_kv_cache_capacity``)
    tokens    short prompts that stay within sink + recent: tokens of both engines side by side
    tpot      decode step time at each context (32k first, then 64k, 8k), at the batch where
              dense is at its KV limit (rounded down to a captured CUDA graph size), with the
              step's HBM floor: weights read (top-k routed experts per layer: the dummy
              weights' near-flat router, ``decode_step_bytes``) + KV rows read, over the device
              copy bandwidth measured in the same process; and the first context's batch at
              1024 tokens, which splits its step into the part without KV and what the KV adds
              (``step_anatomy``)
    long      prompts of 16k-32k tokens, 512 output tokens each, all arriving at once, about
              1.6x as many as dense holds: output tokens/s, requests running, preemptions

Writes JSON (``--out``; also ``<out>.partial.json`` after every result, so a cut-off run keeps
what it measured), a figure (``--plot DIR``: vllm_kv_cuda.png) and prints every figure with
its floor and goal.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from omni_passes.bench.vllm_common import (
    DecodeSteps,
    EngineProcess,
    abort_all,
    add_greedy,
    add_plot,
    comma_names,
    copy_bandwidth,
    goal,
    gpu_total_bytes,
    measure_each,
    partial_saver,
    print_failure,
    print_goals,
    reported_errors,
    serve,
    start_run,
    work_dir,
)
from omni_passes.cli.common import UserError, publish, say

# DeepSeek-V2-Lite's config.json (huggingface.co/deepseek-ai/DeepSeek-V2-Lite), without its
# auto_map (transformers and vLLM have the architecture built in).
V2_LITE_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1,
    "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}
# Batch sizes vLLM captures CUDA graphs for: fewer than its default (1..512) to start faster;
# a TPOT batch is rounded down to one of them, so its decode step replays a graph unpadded.
CAPTURE_SIZES = [1, 2, 4] + list(range(8, 65, 4)) + list(range(72, 129, 8)) + list(range(144, 257, 16))
STAGES = ("capacity", "tokens", "tpot", "long")
REFERENCE_CONTEXT = 1024  # a context whose KV costs the step next to nothing, beyond either window
GOALS = {"capacity": 1.9, "tpot": 0.64, "tpot_floor": 0.70, "long": 1.5}
CONCURRENCY_LINE = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")
SIZE_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")


# --------------------------------------------------------------------------- pure helpers
def write_v2_lite(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(V2_LITE_CONFIG, indent=1))
    return path


def deepseek_weight_bytes(config: dict, itemsize: int = 2) -> int:
    """Parameter bytes of a DeepSeek-V2/V3 config (MLA, dense first layers, routed + shared experts)."""
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    qk = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    rank, rope, v = config["kv_lora_rank"], config["qk_rope_head_dim"], config["v_head_dim"]
    q_rank = config.get("q_lora_rank")
    q = hidden * heads * qk if not q_rank else hidden * q_rank + q_rank + q_rank * heads * qk
    attn = q + hidden * (rank + rope) + rank + rank * heads * (config["qk_nope_head_dim"] + v) + heads * v * hidden
    dense_mlp = 3 * hidden * config["intermediate_size"]
    moe_inter, experts = config["moe_intermediate_size"], config["n_routed_experts"]
    moe = 3 * hidden * moe_inter * (experts + config.get("n_shared_experts", 0)) + hidden * experts
    dense_layers = config.get("first_k_dense_replace", 0)
    params = (layers * (attn + 2 * hidden) + dense_layers * dense_mlp + (layers - dense_layers) * moe
              + 2 * config["vocab_size"] * hidden + hidden)
    return params * itemsize


def auto_utilization(total_bytes: int, weight_bytes: int, kv_bytes: float, overhead_bytes: float = 5 * 2**30) -> float:
    """gpu_memory_utilization that leaves about ``kv_bytes`` of KV cache after the weights and
    vLLM's activation/graph overhead, within [0.3, 0.92]."""
    return round(min(0.92, max(0.3, (weight_bytes + overhead_bytes + kv_bytes) / total_bytes)), 3)


def half_pattern(num_layers: int) -> list[int]:
    """The odd decoder layers: half of them (13 of DeepSeek-V2-Lite's 27), spread over the depth."""
    return list(range(1, num_layers, 2))


def tpot_batch(num_blocks: int, block_size: int, tokens_per_request: int, capture_sizes: list[int]) -> int:
    """The batch where a dense engine is at its KV limit for requests of ``tokens_per_request``
    tokens (block 0 is vLLM's null block), rounded down to a captured graph size; 0 if none fits."""
    limit = (num_blocks - 1) // -(-tokens_per_request // block_size)
    fitting = [s for s in capture_sizes if s <= limit]
    return max(fitting) if fitting else 0


def decode_step_bytes(weights: dict, batch: int, context: int, kv_row_bytes: int, dense_layers: int,
                      compressed_layers: int, window: int) -> dict:
    """Bytes one decode step must read from HBM: the weights it uses and the KV rows it attends to.

    ``weights``: {"dense_bytes" (read every step: attention, shared experts, norms, lm_head),
    "expert_bytes" (all routed experts), "experts", "top_k"}. Of the routed experts a step reads
    at least ``top_k`` per MoE layer, and that lower bound is the floor's: vLLM's dummy weights
    (uniform in +-1e-3) give router logits of about 1e-5 and near-flat scores, so a batch does
    not spread over the experts the way real traffic does. The H100 run says so: dense at 32k,
    batch 16, stepped in 9.66 ms, while with every expert a uniformly routed batch of 16 would
    touch (50.7 of 64) the step must move 41.5 GB, 13.9 ms at the measured bandwidth. KV: every
    request reads ``context`` rows per dense layer and ``min(context, window)`` per compressed
    layer, ``kv_row_bytes`` each.
    """
    weight_bytes = weights["dense_bytes"] + weights["expert_bytes"] * min(weights["top_k"], weights["experts"]) / weights["experts"]
    kv = batch * kv_row_bytes * (dense_layers * context + compressed_layers * min(context, window))
    return {"weights": int(weight_bytes), "kv": int(kv), "total": int(weight_bytes + kv)}


def capacity_bounds(layers: int, groups: list[dict], tokens: int, block_size: int, sink: int, recent: int) -> dict:
    """What vLLM's max concurrency at ``tokens`` tokens can be, compressed over dense, given the
    compressed engine's KV groups (``layout["groups"]``: spec, layers, max_blocks_per_request).

    vLLM pads every group to the largest one's layer count (``group_size``), and one block id
    costs a page in each of ``group_size`` layers, so a request of ``tokens`` tokens costs
    ``group_size · Σ_groups blocks(group)`` pages against dense's ``layers · blocks``. Bounds:
    ``padding`` (compressed groups hold nothing), ``decode_window`` (they hold sink/bs + recent/bs
    + 1 blocks, a decoding request's most), ``counted`` (they hold what the spec reports as its
    peak, ``max_blocks_per_request``: what vLLM's figure uses).
    """
    full = -(-tokens // block_size)
    size = max(len(g["layers"]) for g in groups)
    compressed = [g for g in groups if g.get("sink") is not None]
    dense_groups = len(groups) - len(compressed)
    window = sink // block_size + recent // block_size + 1

    def ratio(per_compressed_group: int) -> float:
        return layers * full / (size * (dense_groups * full + len(compressed) * min(full, per_compressed_group)))

    peak = max((g["max_blocks_per_request"] for g in compressed), default=0)
    return {"group_size": size, "padding": ratio(0), "decode_window": ratio(window), "counted": ratio(peak),
            "window_blocks": window, "counted_blocks": peak, "full_blocks": full}


def step_anatomy(short: dict, long: dict) -> dict:
    """One decode step split into the part without KV (the same batch at a short context: weights,
    launches, small kernels) and what the long context's KV adds, for each engine: the added time
    against the added floor (its KV bytes over the bandwidth) is how efficiently the attention
    kernels read the KV. ``short``/``long``: two ``summary["tpot"]`` entries of the same batch."""
    if short["batch"] != long["batch"]:
        raise ValueError(f"step_anatomy: batches differ ({short['batch']} vs {long['batch']})")
    out = {"batch": long["batch"]}
    for name in ("dense", "compressed"):
        base, full = short[f"{name}_ms"], long[f"{name}_ms"]
        added_floor = long[f"{name}_floor_ms"] - short[f"{name}_floor_ms"]
        out[name] = {"base_ms": base, "base_beyond_floor_ms": base - short[f"{name}_floor_ms"],
                     "kv_added_ms": full - base, "kv_added_floor_ms": added_floor,
                     "kv_efficiency": added_floor / (full - base) if full > base else None}
    return out


def parse_capacity(lines: list[str]) -> dict:
    """vLLM's capacity log lines (0.26 CUDA prints size and concurrency on two lines)."""
    found: dict[str, Any] = {}
    for line in lines:
        if match := SIZE_LINE.search(line):
            found["tokens"] = int(match.group(1).replace(",", ""))
        if match := CONCURRENCY_LINE.search(line):
            found["max_model_len"] = int(match.group(1).replace(",", ""))
            found["max_concurrency"] = float(match.group(2))
            found["line"] = match.group(0)
    return found


def first_divergence(a: list[int], b: list[int], top_logprobs: list[list[float]] | None) -> dict:
    """Where two greedy token lists part, and the top-2 log-probability gap of ``a`` there (a
    near-tie in bf16 when small)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            gap = None
            if top_logprobs and i < len(top_logprobs) and len(top_logprobs[i]) >= 2:
                gap = top_logprobs[i][0] - top_logprobs[i][1]
            return {"index": i, "gap": gap}
    return {"index": None, "gap": None}


# --------------------------------------------------------------------------- arguments
def add_cuda_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the CUDA run (added to ``bench vllm``'s parser by ``vllm_kv.add_kv_arguments``)."""
    group = parser.add_argument_group("sink+recent KV benchmark on CUDA (--device cuda)")
    group.add_argument("--kv-gpu-memory-utilization", type=float, default=0.0,
                       help="vLLM's gpu_memory_utilization, the same for both engines (0: chosen from the GPU's "
                            "memory so that about --kv-target-gib of KV cache fits, see auto_utilization)")
    group.add_argument("--kv-target-gib", type=float, default=16.0,
                       help="with automatic utilization: GiB of KV cache to aim for (the prefill work of the "
                            "TPOT and long stages grows with it)")
    group.add_argument("--kv-contexts", default="32768,65536,8192", help="TPOT contexts, in this order")
    group.add_argument("--kv-decode-steps", type=int, default=24, help="timed decode steps per TPOT context")
    group.add_argument("--kv-long-prompts", default="16384,32768", help="long workload: prompt length range")
    group.add_argument("--kv-long-output", type=int, default=512, help="long workload: output tokens per request")
    group.add_argument("--kv-long-factor", type=float, default=1.6,
                       help="long workload: requests = this x what dense holds at the mean length")
    group.add_argument("--kv-long-max-requests", type=int, default=160)
    group.add_argument("--kv-max-num-batched-tokens", type=int, default=16384)
    group.add_argument("--kv-stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    group.add_argument("--kv-budget-s", type=float, default=0.0,
                       help="time budget of the whole run (0: none): the dense engine gets about half; stages "
                            "it could not start are dropped for both engines")
    group.add_argument("--kv-work-dir", help="model config, pass configs and the compile cache go here")


# --------------------------------------------------------------------------- engine process
class _LogTap:
    """Stands in for ``sys.stdout`` in an engine process: keeps vLLM's capacity lines and sends
    everything to stderr (stdout stays for the parent's --json)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        if "KV cache size" in text or "Maximum concurrency" in text:
            self.lines.extend(text.splitlines())
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _engine(name: str, model: str, pass_config: str | None, engine_kwargs: dict, commands: Any, results: Any) -> None:
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model with a local function
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # FlashInfer is not in the offline bundle
    tap = sys.stdout = _LogTap(sys.__stderr__)
    with reported_errors(name, results):
        from omni_passes.hosts.vllm import kv_probe

        begin = time.perf_counter()
        kwargs = dict(engine_kwargs)
        llm = kv_probe.start(model, pass_config, kwargs.pop("max_model_len"), kwargs.pop("max_num_seqs"), **kwargs)
        startup_s = time.perf_counter() - begin
        ready: dict[str, Any] = {"startup_s": startup_s, "layout": kv_probe.kv_layout(llm),
                                 "logged": parse_capacity(tap.lines)}
        measure_each(ready, {"capacity_32k": functools.partial(kv_probe.capacity_at, llm, 32768),
                             "weights": functools.partial(_weights, llm), "copy_bandwidth": copy_bandwidth})
        results.put((name, "ready", ready))
        serve(name, commands, results, {"tokens": functools.partial(_tokens, llm),
                                        "tpot": functools.partial(_tpot, llm), "long": functools.partial(_long, llm)})
        results.put((name, "stopped", None))


def _tokens(llm: Any, prompts: list[dict], max_tokens: int, tag: str) -> dict:
    """Greedy tokens of short prompts, with the top-2 log-probabilities of each."""
    from omni_passes.hosts.vllm import kv_probe

    run = kv_probe.run(llm, prompts, max_tokens, trace=False, tag=tag, logprobs=2)
    return {k: run[k] for k in ("token_ids", "top_logprobs", "seconds")}


def _weights(llm: Any) -> dict:
    """Parameter bytes of the model, split into routed experts and the rest (what every decode
    step reads); the embedding table and the rotary cos/sin cache are left out (a step reads only
    its batch's rows). kv_b_proj (prefill) is counted next to its absorbed copies W_UK/W_UV
    (decode): about 0.1 GB too many for DeepSeek-V2-Lite."""

    def count(model: Any) -> dict:
        dense = expert = embed = 0
        experts = 0
        for name, param in list(model.named_parameters()) + list(model.named_buffers()):
            size = param.numel() * param.element_size()
            if "embed_tokens" in name or "rotary_emb" in name:  # a step reads only its batch's rows
                embed += size
            elif ".experts." in name and "shared" not in name:
                expert += size
                if name.endswith("w13_weight"):
                    experts = param.shape[0]
            else:
                dense += size
        return {"dense_bytes": dense, "expert_bytes": expert, "embedding_bytes": embed, "experts": experts}

    found = llm.apply_model(count)[0]
    found["top_k"] = llm.llm_engine.vllm_config.model_config.hf_config.num_experts_per_tok
    return found


def _random_prompts(count: int, lengths: list[int], vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(n)]} for n in lengths[:count]]


def _tpot(llm: Any, context: int, batch: int, steps: int, tag: str, vocab: int, seed: int,
          max_seconds: float = 300.0) -> dict:
    """Decode step time with ``batch`` requests of ``context`` tokens: prefill them all, time
    ``steps`` decode steps in which every request gets a token, then abort them. Gives up (TPOT
    None, ``gave_up`` says why) if they do not all run at once within ``max_seconds``."""
    from omni_passes.hosts.vllm.kv_probe import _engine_core

    engine, core = llm.llm_engine, _engine_core(llm)
    max_tokens = llm.llm_engine.vllm_config.model_config.max_model_len - context
    ids = add_greedy(engine, tag, _random_prompts(batch, [context] * batch, vocab, seed), max_tokens)
    decode = DecodeSteps(ids)
    begin = time.perf_counter()
    max_running = preempted = 0
    gave_up = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        if now - begin > max_seconds:
            gave_up = (f"after {max_seconds:.0f} s: {sum(map(bool, decode.produced.values()))} of {batch} requests "
                       f"had a token, {decode.steady_steps()} steady steps")
            break
        decode.add(now, outputs)
        scheduler = core.scheduler
        max_running = max(max_running, len(scheduler.running))
        preempted = max(preempted, sum(r.num_preemptions for r in scheduler.requests.values()))
        if decode.steady_steps() > steps:
            break
    abort_all(engine, ids)
    result = decode.tpot()
    result.update({"context": context, "batch": batch,
                   "prefill_s": (decode.prefilled_at or time.perf_counter()) - begin,
                   "max_running": max_running, "preemptions": preempted, "gave_up": gave_up})
    return result


def _long(llm: Any, prompt_range: list[int], output: int, requests: int, tag: str, vocab: int, seed: int,
          max_seconds: float = 400.0) -> dict:
    """All requests at once; output tokens/s over the whole run, requests running per step
    (aborted after ``max_seconds``, ``gave_up`` set)."""
    from omni_passes.hosts.vllm.kv_probe import _engine_core

    engine, core = llm.llm_engine, _engine_core(llm)
    rng = random.Random(seed)
    lengths = [rng.randint(*prompt_range) for _ in range(requests)]
    ids = add_greedy(engine, tag, _random_prompts(requests, lengths, vocab, seed), output)
    trace: list[list[float]] = []
    generated = preempted = 0
    begin = time.perf_counter()
    gave_up = None
    while engine.has_unfinished_requests():
        if time.perf_counter() - begin > max_seconds:
            gave_up = f"after {max_seconds:.0f} s with {len(core.scheduler.requests)} requests unfinished"
            abort_all(engine, ids)
            break
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
        scheduler = core.scheduler
        preempted = max(preempted, sum(r.num_preemptions for r in scheduler.requests.values()))
        trace.append([round(time.perf_counter() - begin, 3), len(scheduler.running), len(scheduler.waiting)])
    seconds = time.perf_counter() - begin
    running = [r for _, r, _ in trace if r]
    return {"requests": requests, "prompt_tokens": sum(lengths), "output_tokens": generated, "seconds": seconds,
            "output_tokens_per_s": generated / seconds, "max_running": max(running, default=0),
            "mean_running": statistics.fmean(running) if running else 0.0, "preemptions": preempted,
            "gave_up": gave_up, "running_trace": trace[:: max(1, len(trace) // 400)]}


# --------------------------------------------------------------------------- driver
def _pass_config(args: argparse.Namespace, work: Path, num_layers: int) -> tuple[str, dict]:
    from omni_passes.config import PassConfig

    if getattr(args, "pass_config", None):
        config = PassConfig.load(args.pass_config)
        if "sparse_attention" not in config.passes or not config.sparse_attention.pattern:
            raise UserError(f"{args.pass_config}: the KV benchmark needs 'sparse_attention' in passes and a pattern")
        data = {k: v for k, v in config.to_dict().items() if v is not None}
    else:
        data = {"passes": ["sparse_attention"],
                "sparse_attention": {"sink": 128, "recent": 384, "pattern": half_pattern(num_layers), "free_kv": True}}
    data["report_path"] = str(work / "compressed_report.json")
    path = work / "compressed.json"
    path.write_text(json.dumps(data))
    return str(path), data


def main(args: argparse.Namespace) -> int:
    start_run()
    stages = comma_names("--kv-stages", args.kv_stages, STAGES, "stage")
    contexts = [int(x) for x in args.kv_contexts.split(",") if x.strip()]
    prompt_range = [int(x) for x in args.kv_long_prompts.split(",")]
    if len(prompt_range) != 2 or prompt_range[0] > prompt_range[1]:
        raise UserError(f"--kv-long-prompts must be LOW,HIGH, got {args.kv_long_prompts!r}")
    work = work_dir(args.kv_work_dir, "omni-bench-vllm-kv-cuda-")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(work / "vllm-cache"))  # both engines share compiled graphs
    model = args.model or str(write_v2_lite(work / "deepseek-v2-lite"))
    model_config = json.loads((Path(model) / "config.json").read_text())
    layers, vocab = model_config["num_hidden_layers"], model_config["vocab_size"]
    compressed_path, compressed = _pass_config(args, work, layers)
    attn = compressed["sparse_attention"]
    sink, recent, pattern = attn.get("sink", 128), attn.get("recent", 384), attn["pattern"]
    utilization = args.kv_gpu_memory_utilization
    if not utilization:
        total = gpu_total_bytes()
        if total is None:
            utilization = 0.7
            say("could not read the GPU's memory (nvidia-smi); gpu_memory_utilization 0.7")
        else:
            utilization = auto_utilization(total, deepseek_weight_bytes(model_config), args.kv_target_gib * 2**30)
            say(f"gpu_memory_utilization {utilization} (GPU {total / 2**30:.1f} GiB, weights "
                f"{deepseek_weight_bytes(model_config) / 2**30:.1f} GiB, aiming at {args.kv_target_gib:g} GiB of KV)")
    decode_extra = args.kv_decode_steps + 64
    max_model_len = max(args.kv_max_model_len, max(contexts + [prompt_range[1] + args.kv_long_output]) + decode_extra)
    max_model_len = -(-max_model_len // 256) * 256
    engine_kwargs = {"max_model_len": max_model_len, "max_num_seqs": max(CAPTURE_SIZES), "load_format": "dummy",
                     "skip_tokenizer_init": True, "enable_prefix_caching": False,
                     "gpu_memory_utilization": utilization,
                     "max_num_batched_tokens": args.kv_max_num_batched_tokens,
                     "compilation_config": {"cudagraph_capture_sizes": CAPTURE_SIZES}}
    result: dict[str, Any] = {
        "device": "cuda", "model": model, "model_config": {k: model_config[k] for k in (
            "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "qk_rope_head_dim")},
        "pass_config": compressed, "sink": sink, "recent": recent, "pattern": pattern,
        "engine_kwargs": {k: v for k, v in engine_kwargs.items() if k != "compilation_config"},
        "capture_sizes": CAPTURE_SIZES, "stages": stages, "engines": {}}
    save = partial_saver(args.out, work / "vllm_kv_cuda.partial.json", result)

    begin = time.perf_counter()
    budget = args.kv_budget_s or math.inf
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    plan: list[tuple[str, dict]] = []  # the stages dense ran, replayed on the compressed engine
    for name, config in (("dense", None), ("compressed", compressed_path)):
        say(f"starting engine {name} ({'sparse_attention on layers ' + str(pattern) if config else 'vLLM as it is'})")
        engine = EngineProcess(ctx, name, _engine, (model, config, engine_kwargs), results, timeout=3600)
        record: dict[str, Any] = result["engines"].setdefault(name, {})
        try:
            record["ready"] = ready = engine.receive("ready")
            save()
            layout = ready["layout"]
            at_32k = ready.get("capacity_32k", {}).get("max_concurrency", float("nan"))
            copy = ready.get("copy_bandwidth", {}).get("bytes_per_s", float("nan"))
            say(f"engine {name} ready in {ready['startup_s']:.0f} s: {layout['num_blocks']} blocks of "
                f"{layout['block_size']} tokens; vLLM logged {ready['logged'].get('line')}; at 32k tokens "
                f"{at_32k:.2f}x; copy {copy / 1e12:.2f} TB/s"
                + "".join(f"; {k}: {v}" for k, v in ready.items() if k.endswith("_error")))
            if name == "dense":
                plan = _plan(stages, contexts, ready, args, prompt_range, vocab, decode_extra)
            # The compressed engine repeats what dense ran and takes about as long.
            deadline = begin + budget / 2
            done = []
            for kind, payload in plan:
                if name == "dense" and time.perf_counter() > deadline:
                    say(f"time budget: dropping {kind} {payload.get('context', '')} for both engines")
                    continue
                started = time.perf_counter()
                value = engine.ask(kind, payload)
                value["wall_s"] = time.perf_counter() - started
                record.setdefault(kind, []).append(value)
                done.append((kind, payload))
                save()
                say(f"  {name} {kind}: {_brief(kind, value)}")
            if name == "dense":
                plan = done
        except Exception as exc:  # noqa: BLE001  (recorded; the other engine still runs)
            record["error"] = str(exc)[-4000:]
            say(f"engine {name} FAILED: {str(exc)[-2000:]}")
            save()
        finally:
            engine.stop()
    result["wall_s"] = time.perf_counter() - begin
    result["summary"] = summarize(result)
    if args.plot:
        add_plot(result, _plot, args.plot)
    save()
    publish(result, args.out, args.json, print_summary)
    return 0 if all("error" not in e for e in result["engines"].values()) else 1


def _plan(stages, contexts, ready, args, prompt_range, vocab, decode_extra) -> list[tuple[str, dict]]:
    """The commands both engines run, sized from the dense engine's KV pool."""
    layout = ready["layout"]
    blocks, block_size = layout["num_blocks"], layout["block_size"]
    plan: list[tuple[str, dict]] = []
    if "tokens" in stages:
        prompts = _random_prompts(4, [24, 40, 64, 100], vocab, seed=1)
        plan.append(("tokens", {"prompts": prompts, "max_tokens": 64, "tag": "tok-"}))
    tpots = []
    for context in contexts if "tpot" in stages else []:
        # Before every request decodes, the first ones generate a token per prefill step.
        batch = tpot_batch(blocks, block_size, context + decode_extra, CAPTURE_SIZES)
        prefill_steps = -(-batch * context // args.kv_max_num_batched_tokens)
        batch = tpot_batch(blocks, block_size, context + decode_extra + prefill_steps, CAPTURE_SIZES)
        if batch:
            tpots.append(("tpot", {"context": context, "batch": batch, "steps": args.kv_decode_steps,
                                   "tag": f"tpot{context}-", "vocab": vocab, "seed": context}))
    long = []
    if "long" in stages:
        mean = (prompt_range[0] + prompt_range[1]) // 2 + args.kv_long_output
        holds = (blocks - 1) // -(-mean // block_size)
        requests = min(args.kv_long_max_requests, max(2, round(args.kv_long_factor * holds)))
        long.append(("long", {"prompt_range": prompt_range, "output": args.kv_long_output, "requests": requests,
                              "tag": "long-", "vocab": vocab, "seed": 7}))
    # The same batch at a short context: the step without its KV (weights, launches, small
    # kernels), so the first context's step splits into that and what its KV costs (``anatomy``).
    reference = []
    if tpots:
        first = tpots[0][1]
        reference.append(("tpot", dict(first, context=REFERENCE_CONTEXT, tag=f"tpot{REFERENCE_CONTEXT}-", seed=1)))
    # The goals' figures first (TPOT at the first context, the long workload), then the rest.
    return plan + tpots[:1] + reference + long + tpots[1:]


def _brief(kind: str, value: dict) -> str:
    if kind == "tpot":
        tpot = value["tpot_s"]
        return (f"context {value['context']} batch {value['batch']}: TPOT "
                f"{'n/a' if tpot is None else f'{tpot * 1e3:.2f} ms'} over {value['steps']} steps "
                f"(prefill {value['prefill_s']:.0f} s, running max {value['max_running']}, preemptions "
                f"{value['preemptions']})" + (f"; GAVE UP {value['gave_up']}" if value.get("gave_up") else ""))
    if kind == "long":
        return (f"{value['requests']} requests, {value['output_tokens_per_s']:.0f} output tok/s, running max "
                f"{value['max_running']} mean {value['mean_running']:.1f}, preemptions {value['preemptions']}, "
                f"{value['seconds']:.0f} s" + (f"; GAVE UP {value['gave_up']}" if value.get("gave_up") else ""))
    return f"{value.get('seconds', 0):.1f} s"


# --------------------------------------------------------------------------- report
def summarize(result: dict) -> dict:
    """Ratios, floors and the goals, from whatever both engines measured."""
    engines = result["engines"]
    dense, comp = engines.get("dense", {}), engines.get("compressed", {})
    summary: dict[str, Any] = {"goals": []}
    layers = result["model_config"]["num_hidden_layers"]
    row_bytes = (result["model_config"]["kv_lora_rank"] + result["model_config"]["qk_rope_head_dim"]) * 2
    window = result["sink"] + result["recent"]
    npattern = len(result["pattern"])
    if "capacity_32k" in dense.get("ready", {}) and "capacity_32k" in comp.get("ready", {}):
        d, c = dense["ready"], comp["ready"]
        summary["capacity_logged"] = {"dense": d["logged"], "compressed": c["logged"]}
        if d["logged"].get("max_concurrency") and c["logged"].get("max_concurrency"):
            summary["capacity_logged_ratio"] = c["logged"]["max_concurrency"] / d["logged"]["max_concurrency"]
        ratio = c["capacity_32k"]["max_concurrency"] / d["capacity_32k"]["max_concurrency"]
        summary["capacity_32k"] = {"dense": d["capacity_32k"], "compressed": c["capacity_32k"], "ratio": ratio}
        summary["goals"].append(goal("max concurrency at 32k (vLLM's figure), compressed / dense", ratio, ">=",
                                     GOALS["capacity"], _capacity_reason(result, c)))
    for name in ("dense", "compressed"):
        engine = engines.get(name, {})
        if "weights" not in engine.get("ready", {}) or "copy_bandwidth" not in engine["ready"]:
            continue
        bandwidth = engine["ready"]["copy_bandwidth"]["bytes_per_s"]
        for run in engine.get("tpot", []):
            compressed_layers = npattern if name == "compressed" else 0
            floor = decode_step_bytes(engine["ready"]["weights"], run["batch"], run["context"], row_bytes,
                                      layers - compressed_layers, compressed_layers, window)
            run["floor_bytes"] = floor
            run["floor_s"] = floor["total"] / bandwidth
            run["of_floor"] = run["floor_s"] / run["tpot_s"] if run.get("tpot_s") else None
    pairs = {}
    for run in dense.get("tpot", []):
        other = next((r for r in comp.get("tpot", []) if r["context"] == run["context"]), None)
        if other and run.get("tpot_s") and other.get("tpot_s") and "floor_s" in run and "floor_s" in other:
            pairs[run["context"]] = {"batch": run["batch"], "dense_ms": run["tpot_s"] * 1e3,
                                     "compressed_ms": other["tpot_s"] * 1e3,
                                     "ratio": other["tpot_s"] / run["tpot_s"],
                                     "dense_floor_ms": run["floor_s"] * 1e3,
                                     "compressed_floor_ms": other["floor_s"] * 1e3,
                                     "floor_ratio": other["floor_s"] / run["floor_s"],
                                     "compressed_of_floor": other["of_floor"], "dense_of_floor": run["of_floor"],
                                     # the step time beyond the floor (launches, small GEMMs, MoE, the
                                     # attention kernels' inefficiency), and the ratio if the compressed
                                     # step spent exactly dense's there
                                     "dense_beyond_floor_ms": (run["tpot_s"] - run["floor_s"]) * 1e3,
                                     "compressed_beyond_floor_ms": (other["tpot_s"] - other["floor_s"]) * 1e3,
                                     "ratio_at_dense_overhead": (other["floor_s"] + run["tpot_s"] - run["floor_s"])
                                     / run["tpot_s"],
                                     "prefill_ratio": (other["prefill_s"] / run["prefill_s"]
                                                       if run.get("prefill_s") and other.get("prefill_s") else None)}
    summary["tpot"] = pairs
    if REFERENCE_CONTEXT in pairs and pairs.keys() - {REFERENCE_CONTEXT}:
        long_context = 32768 if 32768 in pairs else max(pairs.keys() - {REFERENCE_CONTEXT})
        summary["anatomy"] = step_anatomy(pairs[REFERENCE_CONTEXT], pairs[long_context])
    if 32768 in pairs:
        p = pairs[32768]
        floor = next(r for r in comp["tpot"] if r["context"] == 32768)["floor_bytes"]
        if p["floor_ratio"] > GOALS["tpot"]:
            why = (f"even the HBM floors are in ratio {p['floor_ratio']:.3f}: of the compressed step's "
                   f"{floor['total'] / 1e9:.1f} GB, {floor['weights'] / 1e9:.1f} GB are weights, which every step "
                   f"reads alike; only the KV of {len(result['pattern'])} of {layers} layers shrinks")
        else:
            why = (f"the floors are in ratio {p['floor_ratio']:.3f}, but the compressed step runs at "
                   f"{_pct(p['compressed_of_floor'])}, dense at {_pct(p['dense_of_floor'])}: beyond its floor dense "
                   f"spends {p['dense_beyond_floor_ms']:.2f} ms a step, compressed "
                   f"{p['compressed_beyond_floor_ms']:.2f} ms; spending dense's, the ratio would be "
                   f"{p['ratio_at_dense_overhead']:.3f}")
        summary["goals"].append(goal("TPOT at 32k, same batch, compressed / dense", p["ratio"], "<=", GOALS["tpot"],
                                     why))
        at_dense = p["compressed_floor_ms"] / (p["compressed_floor_ms"] + p["dense_beyond_floor_ms"])
        summary["goals"].append(goal("compressed TPOT at 32k: floor / measured", p["compressed_of_floor"], ">=",
                                     GOALS["tpot_floor"], "the step does more than move its bytes (kernel "
                                     "efficiency, MoE compute, launch gaps): "
                                     f"{p['compressed_beyond_floor_ms']:.2f} ms beyond its floor, dense "
                                     f"{p['dense_beyond_floor_ms']:.2f} ms ({_pct(p['dense_of_floor'])}); with dense's "
                                     f"the compressed step would run at {_pct(at_dense)}"))
    d_long, c_long = dense.get("long", []), comp.get("long", [])
    if d_long and c_long:
        ratio = c_long[0]["output_tokens_per_s"] / d_long[0]["output_tokens_per_s"]
        summary["long"] = {"dense": {k: v for k, v in d_long[0].items() if k != "running_trace"},
                           "compressed": {k: v for k, v in c_long[0].items() if k != "running_trace"},
                           "ratio": ratio}
        prefill = {name: _prefill_estimate(engines[name], summary["long"][name]) for name in ("dense", "compressed")}
        summary["long"]["prefill_estimate_s"] = prefill
        why = (f"requests running at once: {c_long[0]['mean_running']:.1f} vs {d_long[0]['mean_running']:.1f} on average; "
               "one token of output per "
               f"{summary['long']['dense']['prompt_tokens'] / max(1, summary['long']['dense']['output_tokens']):.0f} "
               "prompt tokens, so prefill dominates")
        if prefill["dense"] and prefill["compressed"]:
            bound = summary["long"]["dense"]["seconds"] / prefill["compressed"]
            summary["long"]["ratio_if_decode_were_free"] = bound
            why += (f": at the prefill rates of the 32k TPOT batch the prompts alone take {prefill['dense']:.1f} s on "
                    f"dense and {prefill['compressed']:.1f} s on compressed of the runs' "
                    f"{summary['long']['dense']['seconds']:.1f} s and {summary['long']['compressed']['seconds']:.1f} s, "
                    f"so even with free decode the ratio could not pass {bound:.2f}")
        summary["goals"].append(goal("long-context output tokens/s, compressed / dense", ratio, ">=", GOALS["long"], why))
    d_tok, c_tok = dense.get("tokens", []), comp.get("tokens", [])
    if d_tok and c_tok:
        a, b = d_tok[0]["token_ids"], c_tok[0]["token_ids"]
        summary["tokens_within_window"] = {
            "equal_sequences": sum(x == y for x, y in zip(a, b)), "sequences": len(a),
            "divergence": [first_divergence(x, y, lp) for x, y, lp in zip(a, b, d_tok[0]["top_logprobs"])],
            "note": "dummy (random) weights give near-flat logits: greedy ties part the sequences; the GPU "
                    "tests compare tokens on a real random checkpoint"}
    return summary


def _prefill_estimate(engine: dict, long: dict) -> float | None:
    """Seconds the long workload's prompts take at the prefill rate the engine showed on the
    TPOT batch at 32k (prefill time of batch × 32k tokens), or None without that run."""
    run = next((r for r in engine.get("tpot", []) if r["context"] == 32768 and r.get("prefill_s")), None)
    if run is None:
        return None
    return long["prompt_tokens"] / (run["batch"] * run["context"] / run["prefill_s"])


def _capacity_reason(result: dict, compressed_ready: dict) -> str:
    groups = compressed_ready["layout"]["groups"]
    layers = result["model_config"]["num_hidden_layers"]
    bs = compressed_ready["layout"]["block_size"]
    b = capacity_bounds(layers, groups, 32768, bs, result["sink"], result["recent"])
    return (f"vLLM gives every KV cache group the same number of layers ({[len(g['layers']) for g in groups]}: the "
            f"smaller group is padded), so a block costs {b['group_size']} layers: even with the compressed layers "
            f"holding nothing the ratio is {layers}/{b['group_size']} = {b['padding']:.3f}; with a decoding "
            f"request's window ({b['window_blocks']} blocks of {bs} against {b['full_blocks']}) {b['decode_window']:.3f}; "
            f"vLLM's figure counts the compressed group's peak per request instead ({b['counted_blocks']} blocks: "
            f"sink + 3 windows during a chunked prefill with async scheduling): {b['counted']:.3f}")


def print_summary(result: dict) -> None:
    s = result["summary"]
    kw = result["engine_kwargs"]
    print(f"vLLM CUDA, DeepSeek-V2-Lite (dummy weights, bf16), gpu_memory_utilization {kw['gpu_memory_utilization']}, "
          f"max_model_len {kw['max_model_len']}; compressed: sink {result['sink']} recent {result['recent']} on "
          f"{len(result['pattern'])} of {result['model_config']['num_hidden_layers']} layers; {result['wall_s']:.0f} s")
    for name, engine in result["engines"].items():
        print_failure(name, engine)
        if "ready" in engine:
            r = engine["ready"]
            at_32k = r.get("capacity_32k", {}).get("max_concurrency", float("nan"))
            copy = r.get("copy_bandwidth", {}).get("bytes_per_s", float("nan"))
            print(f"  {name}: start {r['startup_s']:.0f} s, {r['layout']['num_blocks']} blocks of "
                  f"{r['layout']['block_size']}, logged: {r['logged'].get('line')}, at 32k: {at_32k:.2f}x, copy "
                  f"{copy / 1e12:.2f} TB/s")
    if "capacity_32k" in s:
        print(f"  capacity at 32k: ratio {s['capacity_32k']['ratio']:.3f}"
              + (f"; logged line ratio {s['capacity_logged_ratio']:.3f}" if "capacity_logged_ratio" in s else ""))
    for context, p in sorted(s.get("tpot", {}).items()):
        print(f"  TPOT @{context} batch {p['batch']}: dense {p['dense_ms']:.2f} ms (floor {p['dense_floor_ms']:.2f}, "
              f"{_pct(p['dense_of_floor'])}), compressed {p['compressed_ms']:.2f} ms (floor "
              f"{p['compressed_floor_ms']:.2f}, {_pct(p['compressed_of_floor'])}); ratio {p['ratio']:.3f} "
              f"(floor ratio {p['floor_ratio']:.3f}; at dense's time beyond the floor {p['ratio_at_dense_overhead']:.3f})"
              + (f"; prefill of the batch {p['prefill_ratio']:.3f}x dense's" if p.get("prefill_ratio") else ""))
    if "anatomy" in s:
        a = s["anatomy"]
        for name in ("dense", "compressed"):
            e = a[name]
            print(f"  step anatomy, {name}, batch {a['batch']}: {e['base_ms']:.2f} ms at {REFERENCE_CONTEXT} tokens "
                  f"({e['base_beyond_floor_ms']:.2f} ms beyond its floor), + {e['kv_added_ms']:.2f} ms for the long "
                  f"context's KV against {e['kv_added_floor_ms']:.2f} ms of its floor ({_pct(e['kv_efficiency'])})")
    if "long" in s:
        d, c = s["long"]["dense"], s["long"]["compressed"]
        print(f"  long context ({d['requests']} requests): dense {d['output_tokens_per_s']:.0f} tok/s (running max "
              f"{d['max_running']}, preemptions {d['preemptions']}), compressed {c['output_tokens_per_s']:.0f} tok/s "
              f"(running max {c['max_running']}, preemptions {c['preemptions']}); ratio {s['long']['ratio']:.3f}")
    if "tokens_within_window" in s:
        t = s["tokens_within_window"]
        print(f"  short prompts within the window: {t['equal_sequences']}/{t['sequences']} identical sequences")
    print_goals(s["goals"], digits=3)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}% of floor"


def _plot(result: dict, out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    s = result["summary"]
    colors = {"dense": "tab:gray", "compressed": "tab:blue"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    if "capacity_32k" in s:
        values = [s["capacity_32k"][n]["max_concurrency"] for n in ("dense", "compressed")]
        ax.bar(["dense", "compressed"], values, color=[colors["dense"], colors["compressed"]])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}x", ha="center", va="bottom")
        ax.set_title(f"vLLM max concurrency at 32k tokens\n(ratio {s['capacity_32k']['ratio']:.2f})")
    ax = axes[1]
    contexts = sorted(s.get("tpot", {}))
    if contexts:
        xs = range(len(contexts))
        for shift, name in ((-0.2, "dense"), (0.2, "compressed")):
            ax.bar([x + shift for x in xs], [s["tpot"][c][f"{name}_ms"] for c in contexts], 0.38, color=colors[name],
                   label=f"{name} (measured)")
            ax.scatter([x + shift for x in xs], [s["tpot"][c][f"{name}_floor_ms"] for c in contexts], color="black",
                       marker="_", s=400, zorder=3)
        ax.set_xticks(list(xs), [f"{c // 1024}k\nB={s['tpot'][c]['batch']}" for c in contexts])
        ax.set_ylabel("TPOT, ms (black: HBM floor)")
        ax.set_title("decode step at dense's KV-limit batch")
        ax.legend()
    ax = axes[2]
    for name in ("dense", "compressed"):
        runs = result["engines"].get(name, {}).get("long", [])
        if runs:
            trace = runs[0]["running_trace"]
            ax.step([t for t, _, _ in trace], [r for _, r, _ in trace], where="post", color=colors[name],
                    label=f"{name}: {runs[0]['output_tokens_per_s']:.0f} tok/s")
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests running")
    ax.set_title("long-context workload (16k-32k prompts, 512 out)")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "vllm_kv_cuda.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
