"""`omni-proxy serve`: argument parsing and start-up of the proxy."""

from __future__ import annotations

import argparse
import gc
import os
import sys

from proxy.runtime import run_until_signal, setup_logging
from scheduling.block_hash import DEFAULT_SEED, HASH_ALGOS
from scheduling.policies import POLICIES

from scheduling.slo import DEFAULT_TPOT_S, DEFAULT_TTFT_S, SLOTarget

from .config import ProxyConfig, parse_kv_events

POLICY_FLAGS = {
    # flag dest -> (policy option name, type, help)
    "ttft_share": ("ttft_share", float, "omni: a request is sent to an instance only if its first token is due within this share of the TTFT target; otherwise it waits in the proxy, shortest first (policy default 0.5)"),
    "margin": ("margin", float, "omni: keep predicted TPOT this many error spreads of the learned model below the target (policy default 1.0)"),
    "aging": ("aging", float, "omni: held requests gain this many seconds of priority per second waited (policy default 1.0)"),
    "prefill_max_tokens": ("prefill_max_tokens", int, "omni: optional cap: a prefill instance with this many queued prompt tokens takes no more (default: none, learned)"),
    "prefill_max_running": ("prefill_max_running", int, "omni: optional cap: ... or with this many requests in flight (default: none)"),
    "decode_max_running": ("decode_max_running", int, "omni: optional cap: decode/collocated instances take at most this many requests (default: none, learned from TPOT)"),
    "bypass_tokens": ("bypass_tokens", int, "omni, pd mode: prompts with at most this many uncached tokens skip prefill (0: never; default: skip when the predicted TTFT on a decode instance is lower)"),
    "cache_threshold": ("cache_threshold", float, "cache_aware: least share of the prompt a cached prefix must cover (policy default 0.3)"),
    "balance_abs": ("balance_abs", int, "cache_aware: load gap (requests) beyond which balance wins over cache (policy default 64)"),
    "balance_rel": ("balance_rel", float, "cache_aware: load ratio beyond which balance wins over cache (policy default 1.5)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("instances")
    g.add_argument("--mode", required=True, choices=("pd", "collocated"),
                   help="pd: prefill and decode instances with vLLM's kv_transfer_params protocol; "
                        "collocated: plain vLLM instances that do both")
    g.add_argument("--prefill", action="append", default=[], metavar="URL", help="prefill instance (pd mode), repeatable")
    g.add_argument("--decode", action="append", default=[], metavar="URL", help="decode instance (pd mode), repeatable")
    g.add_argument("--instance", action="append", default=[], metavar="URL", help="instance (collocated mode), repeatable")
    g.add_argument("--kv-events", action="append", default=[], metavar="URL=ENDPOINT",
                   help="subscribe to the vLLM KV event stream of instance URL at ZMQ ENDPOINT "
                        "(e.g. http://127.0.0.1:8001=tcp://127.0.0.1:5557), repeatable")
    g.add_argument("--kv-topic", default="", help="ZMQ topic of the KV event streams (vLLM's kv-events-config topic)")

    g = p.add_argument_group("routing")
    g.add_argument("--policy", default="omni", choices=sorted(POLICIES), help="routing policy")
    g.add_argument("--slo", default=None, metavar="ttft=S,tpot=S",
                   help=f"latency targets the omni policy schedules against (learned per-instance capacity); "
                        f"default ttft={DEFAULT_TTFT_S:g},tpot={DEFAULT_TPOT_S:g}")
    for dest, (_, typ, text) in POLICY_FLAGS.items():
        g.add_argument("--" + dest.replace("_", "-"), dest=dest, type=typ, default=None, help=text)
    g.add_argument("--queue-timeout", type=float, default=120.0,
                   help="seconds a request may be held in the proxy while every instance is at its limits (503 after)")
    g.add_argument("--default-max-tokens", type=int, default=16,
                   help="output length assumed for routing when a request gives no max_tokens")

    g = p.add_argument_group("prefix matching")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="local Hugging Face tokenizer directory (the model's); chat templates applied as vLLM does. "
                        "Without it: the character-block tokenizer the simulator uses")
    g.add_argument("--chars-per-token", type=int, default=4, help="character-block tokenizer: characters per token")
    g.add_argument("--block-size", type=int, default=16, help="KV block size of the instances (vLLM --block-size)")
    g.add_argument("--hash-algo", default="sha256", choices=HASH_ALGOS, help="vLLM --prefix-caching-hash-algo of the instances")
    g.add_argument("--hash-seed", default=DEFAULT_SEED,
                   help="seed of vLLM's first block hash: the instances' PYTHONHASHSEED if they set one")
    g.add_argument("--index-capacity-blocks", type=int, default=1 << 18, help="prefix-index entries kept per instance (LRU)")
    g.add_argument("--max-prefix-blocks", type=int, default=16384,
                   help="leading blocks of a prompt that routing hashes and matches (longer prompts: routed on that prefix)")
    g.add_argument("--approx-ttl", type=float, default=30.0,
                   help="seconds a routing-time guess lives on an instance with KV events unless an event confirms it")

    g = p.add_argument_group("reliability")
    g.add_argument("--retries", type=int, default=2, help="extra attempts on other instances before the first byte")
    g.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to an instance")
    g.add_argument("--first-byte-timeout", type=float, default=300.0,
                   help="seconds from sending to a stream's first event / to a prefill's answer")
    g.add_argument("--idle-timeout", type=float, default=120.0,
                   help="seconds without an event inside a stream (and for a client that stops reading one)")
    g.add_argument("--request-timeout", type=float, default=3600.0,
                   help="seconds for a whole non-streaming answer (a silent instance is caught by the prober sooner)")
    g.add_argument("--health-interval", type=float, default=2.0,
                   help="seconds between GET /health probes of each instance (0: off)")
    g.add_argument("--health-timeout", type=float, default=2.0,
                   help="seconds a probe may take; also the grace a running stream gets once its instance is down")
    g.add_argument("--health-misses", type=int, default=3,
                   help="failed probes in a row that declare an instance down (its requests in flight then fail over)")
    g.add_argument("--breaker-failures", type=int, default=3, help="consecutive failures that open an instance's circuit")
    g.add_argument("--breaker-cooldown", type=float, default=5.0, help="seconds an open circuit stays open (doubles on repeat)")
    g.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024, help="largest request body accepted (413 beyond)")
    g.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds for a request body to arrive once its head has (408 after)")
    g.add_argument("--keepalive-timeout", type=float, default=20.0,
                   help="seconds a client connection may sit idle, or with an incomplete request head, before it is closed")
    g.add_argument("--offload-bytes", type=int, default=1 << 16,
                   help="request bodies this large or larger are parsed and tokenized in a worker process (0: never)")
    g.add_argument("--prompt-workers", type=int, default=2, help="worker processes for large request bodies")

    g = p.add_argument_group("service")
    g.add_argument("--host", default="127.0.0.1", help="address to bind")
    g.add_argument("--port", type=int, default=8000, help="port to bind")
    g.add_argument("--admin-token", default=None,
                   help="token for /admin/instances (Authorization: Bearer TOKEN); default $OMNI_PROXY_ADMIN_TOKEN; "
                        "admin endpoints are off without one")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="stderr log level")
    g.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop even if uvloop is installed")


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    options = {opt: getattr(args, dest) for dest, (opt, _, _) in POLICY_FLAGS.items() if getattr(args, dest) is not None}
    return ProxyConfig(
        mode=args.mode, prefill=args.prefill, decode=args.decode, instances=args.instance, policy=args.policy,
        policy_options=options, slo=SLOTarget.parse(args.slo) if args.slo else SLOTarget(), tokenizer=args.tokenizer, chars_per_token=args.chars_per_token,
        block_size=args.block_size, hash_algo=args.hash_algo, hash_seed=args.hash_seed,
        kv_events=parse_kv_events(args.kv_events), kv_topic=args.kv_topic, host=args.host, port=args.port,
        admin_token=args.admin_token or os.environ.get("OMNI_PROXY_ADMIN_TOKEN") or None, max_body_bytes=args.max_body_bytes, connect_timeout=args.connect_timeout,
        first_byte_timeout=args.first_byte_timeout, idle_timeout=args.idle_timeout,
        request_timeout=args.request_timeout, retries=args.retries, health_interval=args.health_interval,
        health_timeout=args.health_timeout, health_misses=args.health_misses, breaker_failures=args.breaker_failures,
        breaker_cooldown=args.breaker_cooldown, queue_timeout=args.queue_timeout,
        index_capacity_blocks=args.index_capacity_blocks, approx_ttl=args.approx_ttl,
        default_max_tokens=args.default_max_tokens, body_timeout=args.body_timeout,
        keepalive_timeout=args.keepalive_timeout, offload_bytes=args.offload_bytes, prompt_workers=args.prompt_workers,
        max_prefix_blocks=args.max_prefix_blocks,
    )


def main(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    from .app import ProxyServer

    try:
        config = config_from_args(args)
        server = ProxyServer(config)
    except ValueError as exc:
        print(f"omni-proxy serve: {exc}", file=sys.stderr)
        return 2

    async def start():
        await server.start()
        server.intake.warm()
        # what start-up made (modules, configuration: tens of thousands of objects) stays for the
        # process's life: out of the collector's sight, a full collection no longer walks it
        # (about 40 ms on this project's VM, a pause every request in flight would wait out)
        gc.freeze()
        print(f"omni-proxy serve: ready on {server.url} ({config.mode}, policy {config.policy})", file=sys.stderr, flush=True)

    try:
        return run_until_signal(start, server.stop, use_uvloop=not args.no_uvloop)
    except OSError as exc:
        print(f"omni-proxy serve: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
