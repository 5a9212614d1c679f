"""The options of `omni-passes bench graph` and the settings they resolve to (defaults per
device, every value checked once, a bad one named in a ``UserError``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from omni_passes.bench.graph.model import SHAPES, model_config, pattern_layers
from omni_passes.bench.graph.variants import KINDS, Kind, parse_kinds
from omni_passes.cli.common import UserError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: tiny 2, v2-lite 4, v3-slice 2)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="model precision (default: cuda bf16, cpu fp32); fp32 is the exactness check")
    parser.add_argument("--batch", type=int, default=None, help="decode batch (default: cpu 4, cuda 16)")
    parser.add_argument("--context", type=int, nargs="+", default=None, metavar="C",
                        help="decode contexts (default: cpu 1024, cuda 4096 32768)")
    parser.add_argument("--short-context", type=int, default=None, help="C0 for the attention share (default: cpu 64, cuda 128)")
    parser.add_argument("--prefill-len", type=int, default=None, help="prompt length for prefill timing (default: cpu 64, cuda 2048)")
    parser.add_argument("--passes", default=",".join(KINDS),
                        help=f"variants beyond eager and compiled (comma list of {', '.join(KINDS)})")
    parser.add_argument("--sink", type=int, default=None, help="default: cuda 128, cpu 16")
    parser.add_argument("--recent", type=int, default=None, help="default: cuda 384, cpu 48")
    parser.add_argument("--pattern", default="half", help="layers to compress: 'half' (every other layer) or a comma list")
    parser.add_argument("--redundant-slots", type=int, default=None, help="extra slots per MoE layer (default E/8)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds per variant, each against its bases (default 10)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="decode steps (CUDA: graph replays) per variant and round (default: cuda 20, cpu 1: on a "
                             "busy host the two sides of a ratio then run back to back)")
    parser.add_argument("--no-prefill", action="store_true", help="skip prefill timing (saves one compile per variant)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plot", metavar="DIR")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON document here")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also profile 10 decode steps per variant (no CUDA graph) and keep the TOP kernels by "
                             "device time under 'profile' in the JSON")


@dataclass(frozen=True)
class Settings:
    device: str
    dtype: torch.dtype
    shape: str
    hf_config: object
    batch: int
    contexts: list[int]
    short: int
    prefill_len: int | None       # None: no prefill timing
    rounds: int
    steps: int                    # per variant and round
    sink: int
    recent: int
    pattern: list[int]
    kinds: list[Kind]
    extra_slots: int
    profile: int
    out: str | None

    @property
    def all_contexts(self) -> list[int]:
        return sorted({self.short, *self.contexts})

    @property
    def window(self) -> dict:
        return {"sink": self.sink, "recent": self.recent, "pattern": self.pattern}

    @property
    def windowed(self) -> bool:
        return any(k.windowed for k in self.kinds)


def settings(args: argparse.Namespace) -> Settings:
    """Defaults per device filled in and every value checked."""
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available here")
    cuda = device == "cuda"
    dtype = DTYPES[getattr(args, "dtype", None) or ("bf16" if cuda else "fp32")]
    contexts = args.context or ([4096, 32768] if cuda else [1024])
    short = args.short_context or (128 if cuda else 64)
    if any(c < 2 for c in [short, *contexts]):
        raise UserError(f"--context and --short-context must be >= 2, got {contexts} and {short}")
    rounds = args.rounds if getattr(args, "rounds", None) is not None else 10
    steps = args.repeats if args.repeats is not None else (20 if cuda else 1)
    if rounds < 1 or steps < 1:
        raise UserError(f"--rounds and --repeats must be >= 1, got {rounds} and {steps}")
    try:
        kinds = parse_kinds(args.passes)
        hf_config = model_config(args.shape, args.layers)
        pattern = pattern_layers(args.pattern, hf_config.num_hidden_layers)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    extra = args.redundant_slots if args.redundant_slots is not None else max(1, hf_config.n_routed_experts // 8)
    return Settings(
        device=device, dtype=dtype, shape=args.shape, hf_config=hf_config, batch=args.batch or (16 if cuda else 4),
        contexts=contexts, short=short,
        prefill_len=None if args.no_prefill else (args.prefill_len or (2048 if cuda else 64)),
        rounds=rounds, steps=steps,
        sink=args.sink if args.sink is not None else (128 if cuda else 16),
        recent=args.recent if args.recent is not None else (384 if cuda else 48),
        pattern=pattern, kinds=kinds, extra_slots=extra, profile=args.profile, out=args.out)

