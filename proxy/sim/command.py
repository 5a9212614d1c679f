"""`omni-proxy sim`: host simulated vLLM instances on one or more ports."""

from __future__ import annotations

import argparse
import sys

from proxy.runtime import run_until_signal, setup_logging
from proxy.wire.tokens import make_tokenizer

from .faults import KINDS, FaultPlan

FAULT_HELP = {
    "fail": "answer HTTP 500 (JSON)",
    "html": "answer HTTP 500 with an HTML page naming internal hosts",
    "garbage": "answer HTTP 200 with a body that is not JSON (streams: not SSE)",
    "stall": "never answer",
    "hang": "go silent mid-answer, connection open",
    "crash": "reset the connection mid-answer",
    "truncate": "end the answer early, in the middle of an event",
}
from .profile import SimProfile
from .server import ROLES, SimInstance


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, action="append", required=True,
                   help="HTTP port of an instance; repeat to host several instances in this process")
    p.add_argument("--role", action="append", choices=ROLES, default=None,
                   help="role of the instances: once for all, or once per --port (default collocated)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="timing-model JSON (fields and defaults: docs/proxy.md, proxy/sim/profile.py)")
    p.add_argument("--model", default="sim-model", help="model name served on /v1/models and in responses")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (HTTP and KV events)")
    p.add_argument("--kv-events-port", type=int, action="append", default=None,
                   help="ZMQ port to publish KV events on (vLLM's format), once per --port; 0: none for that instance")
    p.add_argument("--kv-topic", default="", help="ZMQ topic of published KV events")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="local Hugging Face tokenizer directory: real token counts and ids (chat templates as vLLM "
                        "applies them); default: the character-block tokenizer")
    f = p.add_argument_group("fault injection (per instance; change at run time with POST /sim/faults)")
    for kind, what in FAULT_HELP.items():
        f.add_argument(f"--{kind}-next", type=int, default=0, metavar="N", help=f"{what}: the next N requests")
        f.add_argument(f"--{kind}-rate", type=float, default=0.0, metavar="P", help=f"{what}: this share of requests")
    f.add_argument("--fault-after-tokens", type=int, default=2,
                   help="tokens generated before a crash, hang or truncation mid-answer")
    f.add_argument("--slowdown", type=float, default=1.0, help="multiply every step time by this factor")
    f.add_argument("--refuse-for", type=float, default=0.0, help="refuse connections for this many seconds after start")
    f.add_argument("--fault-seed", type=int, default=0, help="seed of the fault-rate draws (instance k uses seed + k)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"), help="stderr log level")
    p.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop even if uvloop is installed")


def _per_port(values, ports, name, default):
    if not values:
        return [default] * len(ports)
    if len(values) == 1:
        return values * len(ports)
    if len(values) != len(ports):
        raise ValueError(f"{name} given {len(values)} times for {len(ports)} --port values: give it once or once per port")
    return values


def main(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        profile = SimProfile.load(args.profile) if args.profile else SimProfile()
        tokenizer = make_tokenizer(args.tokenizer, profile.chars_per_token)
        roles = _per_port(args.role, args.port, "--role", "collocated")
        kv_ports = _per_port(args.kv_events_port, args.port, "--kv-events-port", 0)
        if args.kv_events_port and len(args.kv_events_port) == 1 and len(args.port) > 1 and args.kv_events_port[0]:
            raise ValueError("--kv-events-port must be given once per --port (each instance publishes on its own port)")
        instances = []
        for k, (port, role, kv_port) in enumerate(zip(args.port, roles, kv_ports)):
            fields = {f"{kind}_{what}": getattr(args, f"{kind}_{what}") for kind in KINDS for what in ("next", "rate")}
            for name, value in fields.items():
                if name.endswith("_rate") and not 0 <= value <= 1:
                    raise ValueError(f"--{name.replace('_', '-')} is a probability, got {value}")
            if args.slowdown <= 0:
                raise ValueError(f"--slowdown must be positive, got {args.slowdown}")
            plan = FaultPlan(**fields, after_tokens=args.fault_after_tokens, slowdown=args.slowdown,
                             seed=args.fault_seed + k)
            instances.append(SimInstance(port, role, profile, args.model, args.host, kv_port or None, args.kv_topic, plan,
                                         tokenizer))
    except ValueError as exc:
        print(f"omni-proxy sim: {exc}", file=sys.stderr)
        return 2

    async def start():
        for inst in instances:
            await inst.start()
            if args.refuse_for > 0:
                await inst.refuse_for(args.refuse_for)
        for inst in instances:
            events = f", KV events on {inst.kv_endpoint}" if inst.kv_endpoint else ""
            print(f"omni-proxy sim: ready {inst.url} ({inst.role}{events})", file=sys.stderr, flush=True)

    async def stop():
        for inst in instances:
            await inst.stop()

    try:
        return run_until_signal(start, stop, use_uvloop=not args.no_uvloop)
    except OSError as exc:
        print(f"omni-proxy sim: cannot listen: {exc}", file=sys.stderr)
        return 1
