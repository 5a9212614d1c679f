"""`omni-proxy stress soak|large-prompt`: run one scenario, print and write its figures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    soak = sub.add_parser("soak", help="PD proxy, faulty sims, one sim process stopped for a while")
    soak.add_argument("--requests", type=int, default=10_000, help="requests to send")
    soak.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")
    soak.add_argument("--fault-rate", type=float, default=0.05, help="share of upstream attempts that are faulty")
    soak.add_argument("--pause-s", type=float, default=3.0, help="seconds one sim process is SIGSTOPped (0: never)")
    large = sub.add_parser("large-prompt", help="small requests' latency while one huge prompt passes")
    large.add_argument("--prompt-mb", type=float, default=15.0, help="size of the large prompt (MB)")
    large.add_argument("--rate", type=float, default=100.0, help="small requests per second")
    large.add_argument("--quiet-s", type=float, default=2.0, help="seconds of small requests alone first")
    large.add_argument("--variants", default="offload,inline",
                       help="proxies to compare: offload (default settings), inline (--offload-bytes 0)")
    large.add_argument("--plot", default=None, metavar="PNG", help="write small-request latency over time to PNG")
    for q in (soak, large):
        q.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        q.add_argument("--out", default=None, metavar="FILE", help="also write the JSON document to FILE")


def main(args: argparse.Namespace) -> int:
    if args.scenario == "soak":
        from proxy.stress.soak import run

        result = run(args.requests, args.concurrency, args.fault_rate, args.pause_s)
        ok = result["lost"] == 0 and result["hung"] == 0 and result["within_bound"] == result["requests"]
    else:
        from proxy.stress.large_prompt import run

        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        unknown = set(variants) - {"offload", "inline"}
        if unknown:
            print(f"omni-proxy stress: unknown variant(s) {', '.join(sorted(unknown))}; use offload, inline",
                  file=sys.stderr)
            return 2
        result = run(args.prompt_mb, args.rate, args.quiet_s, variants)
        ok = all(v["small_failures"] == 0 for v in result["variants"].values())
        if args.plot:
            from proxy.stress.large_prompt import plot

            plot(result, args.plot)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    return 0 if ok else 1
