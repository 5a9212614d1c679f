"""Configuration of one proxy (what ``omni-proxy serve`` flags fill in), checked up front."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scheduling.block_hash import DEFAULT_SEED, HASH_ALGOS
from scheduling.policies import POLICIES, make_policy
from scheduling.slo import SLOTarget

from .instances import normalize_url

MODES = ("pd", "collocated")


@dataclass
class ProxyConfig:
    mode: str
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)
    policy: str = "omni"
    policy_options: dict[str, Any] = field(default_factory=dict)
    slo: SLOTarget = field(default_factory=SLOTarget)
    tokenizer: str | None = None
    chars_per_token: int = 4
    block_size: int = 16
    hash_algo: str = "sha256"
    hash_seed: str = DEFAULT_SEED
    kv_events: dict[str, str] = field(default_factory=dict)  # instance URL -> ZMQ endpoint
    kv_topic: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    connect_timeout: float = 5.0
    first_byte_timeout: float = 300.0
    idle_timeout: float = 120.0
    request_timeout: float = 3600.0
    retries: int = 2
    health_interval: float = 2.0
    health_timeout: float = 2.0
    health_misses: int = 3
    breaker_failures: int = 3
    breaker_cooldown: float = 5.0
    queue_timeout: float = 120.0
    index_capacity_blocks: int = 1 << 18
    approx_ttl: float = 30.0
    default_max_tokens: int = 16
    keepalive_timeout: float = 20.0
    body_timeout: float = 30.0
    offload_bytes: int = 1 << 16
    max_prefix_blocks: int = 16384
    prompt_workers: int = 2

    def check(self) -> "ProxyConfig":
        """Normalise URLs and reject contradictions, naming the flag and value at fault."""
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.prefill = [normalize_url(u) for u in self.prefill]
        self.decode = [normalize_url(u) for u in self.decode]
        self.instances = [normalize_url(u) for u in self.instances]
        if self.mode == "pd":
            if self.instances:
                raise ValueError("--instance is for --mode collocated; in pd mode give --prefill and --decode")
            if not self.decode:
                raise ValueError("--mode pd needs at least one --decode URL")
        else:
            if self.prefill or self.decode:
                raise ValueError("--prefill/--decode are for --mode pd; in collocated mode give --instance")
            if not self.instances:
                raise ValueError("--mode collocated needs at least one --instance URL")
        every = self.prefill + self.decode + self.instances
        dupes = sorted({u for u in every if every.count(u) > 1})
        if dupes:
            raise ValueError(f"instance URL(s) given more than once: {', '.join(dupes)}")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not isinstance(self.slo, SLOTarget):
            raise ValueError(f"--slo must be an SLOTarget (ttft=S,tpot=S), got {self.slo!r}")
        make_policy(self.policy, slo=self.slo, **self.policy_options)  # rejects options the policy lacks
        if self.hash_algo not in HASH_ALGOS:
            raise ValueError(f"--hash-algo must be one of {', '.join(HASH_ALGOS)}, got {self.hash_algo!r}")
        self.kv_events = {normalize_url(u): e for u, e in self.kv_events.items()}
        for url, endpoint in self.kv_events.items():
            if url not in every:
                raise ValueError(f"--kv-events names {url}, which is not one of the instances")
            if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"--kv-events endpoint for {url} must be a ZMQ address (tcp://HOST:PORT), got {endpoint!r}")
        positive = ("chars_per_token", "block_size", "max_body_bytes", "breaker_failures", "index_capacity_blocks",
                    "default_max_tokens", "connect_timeout", "first_byte_timeout", "idle_timeout",
                    "request_timeout", "health_timeout", "health_misses", "queue_timeout", "keepalive_timeout",
                    "body_timeout", "prompt_workers", "max_prefix_blocks")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)!r}")
        for name in ("retries", "health_interval", "breaker_cooldown", "approx_ttl", "offload_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)!r}")
        return self


def parse_kv_events(items: list[str]) -> dict[str, str]:
    """``["http://h:8001=tcp://h:5557", ...]`` -> {url: endpoint}."""
    out: dict[str, str] = {}
    for item in items:
        url, sep, endpoint = item.partition("=")
        if not sep or not url or not endpoint:
            raise ValueError(f"--kv-events takes URL=ENDPOINT (e.g. http://127.0.0.1:8001=tcp://127.0.0.1:5557), got {item!r}")
        out[url] = endpoint
    return out
