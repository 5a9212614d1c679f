"""Arguments and set-up shared by every subcommand that builds and compiles a model."""

from __future__ import annotations

import argparse

import torch

from omni_passes.cli.common import UserError
from omni_passes.config import KNOWN_PASSES, ConfigError, PassConfig


def add_model_arguments(parser: argparse.ArgumentParser, default_passes: str = "redundant_experts") -> None:
    parser.add_argument("--model-config", default="tiny", metavar="PATH|tiny",
                        help="a transformers MoE causal-LM config.json or its directory (DeepSeek-V2/V3, Qwen3-MoE, "
                             "Mixtral, GPT-OSS, ...; random weights), or a tiny model: tiny (DeepSeek-V3, default), "
                             "tiny-deepseek-v2, tiny-qwen3-moe, tiny-mixtral, tiny-gpt-oss")
    parser.add_argument("--layers", type=int, default=None, metavar="N", help="override the number of decoder layers")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--pass-config", metavar="FILE", help="pass configuration JSON (the format OMNI_PASSES_CONFIG uses)")
    group.add_argument("--passes", default=None, metavar="LIST",
                       help=f"comma-separated passes ({', '.join(KNOWN_PASSES)}); default: {default_passes}")
    parser.add_argument("--placement", metavar="FILE", help="placement JSON (overrides the pass config's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(_default_passes=default_passes)


def pass_config_from_args(args: argparse.Namespace) -> PassConfig:
    try:
        if args.pass_config:
            config = PassConfig.load(args.pass_config)
        else:
            names = [p.strip() for p in (args.passes or args._default_passes).split(",") if p.strip()]
            config = PassConfig.from_dict({"passes": names}, source="--passes")
        if args.placement:
            data = config.to_dict()
            data["placement"] = args.placement
            config = PassConfig.from_dict(data, source=config.source)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    return config


def build_from_args(args: argparse.Namespace):
    """(hf_config, model) for the arguments; errors become UserError."""
    from omni_passes.models import ModelConfigError, build_model, load_hf_config

    try:
        hf_config = load_hf_config(args.model_config, layers=args.layers)
    except ModelConfigError as exc:
        raise UserError(str(exc)) from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available here")
    try:
        model = build_model(hf_config, dtype=getattr(torch, args.dtype), device=args.device, seed=args.seed)
    except ModelConfigError as exc:
        raise UserError(f"model config {args.model_config}: {exc}") from None
    return hf_config, model
