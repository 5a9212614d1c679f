"""`omni-passes` command line: one subcommand per module, imported only when used.

Each subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int``.
``bench`` has its own second level: ``omni_passes.bench.<name>`` with the same two functions.
``--json`` everywhere prints one JSON document on stdout and nothing else there; logs go to
stderr (see ``omni_passes.cli.common``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("omni_passes.cli.demo", "tiny DeepSeek-V3 on CPU: dispatch pass, report, check, timings"),
    "inspect": ("omni_passes.cli.inspect", "run passes on any transformers MoE model, show and check the rewrite"),
    "plan": ("omni_passes.cli.plan", "plan a redundant-expert placement from recorded loads"),
    "search-attn": ("omni_passes.cli.search_attn", "search which layers to compress to sink+recent attention"),
}
BENCHES = {
    "graph": ("omni_passes.bench.graph", "graph-mode decode/prefill: eager vs compiled vs each pass"),
    "attn": ("omni_passes.bench.attn", "decode attention kernels: ours vs SDPA vs FlexAttention"),
    "attn-paged": ("omni_passes.bench.attn_paged", "paged sink+recent MLA decode (vLLM's cache layout) vs its floors"),
    "attn-prefill": ("omni_passes.bench.attn_prefill", "sink+recent prefill kernel vs dense FA3 and its FLOPs floor"),
    "placement": ("omni_passes.bench.placement", "expert placement: ours vs vLLM's EPLB"),
    "ep": ("omni_passes.bench.ep", "expert parallelism across GPUs with each placement"),
    "vllm": ("omni_passes.bench.vllm", "vLLM with the passes on vs off: CPU; --device cuda placement engines; --kv sink+recent KV"),
}


def _add_group(subparsers, table):
    for name, (module_name, help_text) in table.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            sub.set_defaults(_missing=f"'{name}' is not available in this build ({module_name} missing)")
            continue
        module.add_arguments(sub)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-passes", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Import only the module of the subcommand asked for, so `--help` of one never pays
    # for (or breaks on) another's optional dependencies.
    wanted = argv[0] if argv else None
    table = {k: v for k, v in SUBCOMMANDS.items() if k == wanted} or {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name not in table:
            subparsers.add_parser(name, help=help_text, add_help=False)
    _add_group(subparsers, table)
    if wanted != "bench":
        subparsers.add_parser("bench", help="benchmarks", description="benchmarks")
    else:
        bench = subparsers.add_parser("bench", help="benchmarks", description="benchmarks")
        bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
        which = argv[1] if len(argv) > 1 else None
        for name, (module_name, help_text) in BENCHES.items():
            if name != which:
                bench_sub.add_parser(name, help=help_text)
        _add_group(bench_sub, {k: v for k, v in BENCHES.items() if k == which})
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        parser.error(args._missing)
    if not hasattr(args, "_module"):
        parser.error(f"unknown command: {' '.join(argv)}")
    module = importlib.import_module(args._module)
    from omni_passes.cli.common import UserError

    try:
        return int(module.main(args) or 0)
    except UserError as exc:  # bad input: one line naming the problem, not a traceback
        print(f"omni-passes {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
