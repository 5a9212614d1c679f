"""Start vLLM on a tiny DeepSeek-V3 with the omni pass on or off and say where it stands.

    python tools/vllm_probe_start.py OUT [--omni identity|redundant] [--hang-dump SECONDS] [--max-tokens N]

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a hang is visible:
after ``--hang-dump`` seconds every thread's stack is written to stderr and the process exits.
Prints ``START_S``, ``TOKENS``, and with the passes on the worker's ``omni_status`` (report,
loads, placement) as ``STATUS``; ``OMNI_PASSES_GRAPH_DUMP`` makes the host save the graphs it is
given (the test fixtures). A tool for the GPU machine's first contact with a new vLLM; it is not
part of the package.
"""

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--omni", choices=["identity", "redundant"], default=None)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--hang-dump", type=float, default=120)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--eager", action="store_true")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.hang_dump, exit=True)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from omni_passes.testing.vllm_cuda_dump import build_checkpoint

    model = build_checkpoint(out / "ckpt")
    # few CUDA-graph sizes: a start costs less (the probe's batches are small)
    compilation, extension = {"cudagraph_capture_sizes": [1, 2, 4, 8]}, {}
    if args.omni:
        config = {"passes": ["redundant_experts"], "report_path": str(out / "report.json"),
                  "expert_load_path": str(out / "loads.npy"), "slot_load_path": str(out / "slot_loads.npy"),
                  "expert_load_interval_steps": 1}
        if args.omni == "redundant":
            import torch

            from omni_passes.model_info import MoEModelInfo
            from omni_passes.testing.placements import redundant_permuted

            info = MoEModelInfo.from_hf_config(SimpleNamespace(**json.loads((model / "config.json").read_text())))
            placement = redundant_permuted(len(info.moe_layer_ids), info.num_experts, 4, torch.Generator().manual_seed(1), ranks=4)
            placement.save(out / "placement.json")
            config["placement"] = str(out / "placement.json")
        (out / "passes.json").write_text(json.dumps(config))
        os.environ["OMNI_PASSES_CONFIG"] = str(out / "passes.json")
        compilation["inductor_passes"] = {"post_grad_custom_post_pass": "omni_passes.vllm_post_grad_pass"}
        extension = {"worker_extension_cls": "omni_passes.vllm_control.OmniWorkerExtension"}
    import logging

    logging.getLogger("omni_passes").setLevel(logging.INFO)
    logging.getLogger("omni_passes").addHandler(logging.StreamHandler(sys.stderr))
    from vllm import LLM, SamplingParams

    start = time.time()
    print("LLM_INIT", flush=True)
    llm = LLM(model=str(model), dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.3,
              enforce_eager=args.eager, compilation_config=compilation, **extension)
    print("START_S", round(time.time() - start, 1), flush=True)
    prompts = ["The quick brown fox jumps over", "A mixture of experts model sends every token",
               "Numbers: 0 1 2 3 4 5 6 7 8 9"][: args.prompts]
    result = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True))
    tokens = [list(r.outputs[0].token_ids) for r in result]
    print("TOKENS", json.dumps(tokens), flush=True)
    record = {"tokens": tokens, "prompt_tokens": [len(r.prompt_token_ids) for r in result]}
    if args.omni:
        record["status"] = llm.collective_rpc("omni_status")[0]
        print("STATUS", json.dumps(record["status"])[:3000], flush=True)
    (out / "result.json").write_text(json.dumps(record))
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    sys.exit(main())
