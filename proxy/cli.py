"""`omni-proxy`: the OmniProxy service, its simulated engine, and its benchmarks.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``, imported only when used.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "serve": ("proxy.server.command", "run the OpenAI-compatible proxy in front of vLLM instances (pd or collocated)"),
    "sim": ("proxy.sim.command", "run simulated vLLM instances (continuous batching, prefix cache, KV events, faults)"),
    "bench": ("proxy.bench", "serving benchmark: routers side by side on a simulated cluster"),
    "plan-pd": ("proxy.bench.plan_pd", "recommend a prefill:decode split and PD-bypass threshold for a workload and SLO (simulated sweeps)"),
    "stress": ("proxy.stress.command", "the proxy under faults and load: soak, large-prompt (figures and JSON)"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except empty ones (None, [], False) which would only say "None"."""

    def _get_help_string(self, action):
        if action.default in (None, [], False, "") or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-proxy", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name != wanted:
            subparsers.add_parser(name, help=help_text, add_help=False)
            continue
        sub = subparsers.add_parser(name, help=help_text, description=help_text,
                                    formatter_class=_HelpFormatter)
        sub.set_defaults(_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            sub.set_defaults(_missing=f"'omni-proxy {name}' is not built yet ({module_name} is missing)")
            continue
        module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        parser.error(args._missing)
    module = importlib.import_module(args._module)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
