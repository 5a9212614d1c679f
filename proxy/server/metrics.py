"""Prometheus metrics of one proxy (its own registry, so several proxies fit in one process).

Counters and histograms are fed as requests go; the per-instance gauges are read at scrape
time from a :class:`Snapshot` that the server hands over through a callable, so this module
knows nothing of the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)


@dataclass(frozen=True)
class InstanceView:
    url: str
    role: str
    running: int
    prefill_tokens: int
    kv_tokens: int
    usable: bool
    index_blocks: int
    prefill_slope: float
    in_flight: int


@dataclass(frozen=True)
class Snapshot:
    instances: list[InstanceView] = field(default_factory=list)
    held: dict[str, int] = field(default_factory=dict)


_GAUGES = (
    ("omni_proxy_instance_running", "requests in flight to the instance", "running"),
    ("omni_proxy_instance_prefill_tokens", "uncached prompt tokens sent and not yet prefilled", "prefill_tokens"),
    ("omni_proxy_instance_kv_tokens", "KV tokens of requests in flight", "kv_tokens"),
    ("omni_proxy_instance_usable", "1 if the instance gets requests (not down, circuit not open)", "usable"),
    ("omni_proxy_instance_index_blocks", "prefix-index blocks attributed to the instance", "index_blocks"),
    ("omni_proxy_instance_prefill_seconds_per_token", "learned prefill-time slope", "prefill_slope"),
    ("omni_proxy_instance_attempts", "upstream attempts open on the instance", "in_flight"),
)


class _SnapshotCollector:
    def __init__(self, snapshot: Callable[[], Snapshot]):
        self.snapshot = snapshot

    def collect(self):
        snap = self.snapshot()
        families = []
        for name, text, attr in _GAUGES:
            family = GaugeMetricFamily(name, text, labels=["instance", "role"])
            for inst in snap.instances:
                family.add_metric([inst.url, inst.role], float(getattr(inst, attr)))
            families.append(family)
        held = GaugeMetricFamily("omni_proxy_held_requests", "requests held in the proxy", labels=["stage"])
        for stage, n in snap.held.items():
            held.add_metric([stage], n)
        families.append(held)
        return families


class ProxyMetrics:
    def __init__(self, snapshot: Callable[[], Snapshot]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("omni_proxy_requests", "client requests by endpoint and outcome", ["endpoint", "outcome"], registry=r)
        self.decisions = Counter("omni_proxy_routing_decisions", "routing decisions", ["stage", "instance", "reason"], registry=r)
        self.upstream_errors = Counter("omni_proxy_upstream_errors", "failed upstream attempts", ["instance", "kind"], registry=r)
        self.retries = Counter("omni_proxy_retries", "attempts retried on another instance", ["stage"], registry=r)
        self.fallbacks = Counter("omni_proxy_pd_fallbacks", "PD requests served decode-only", ["reason"], registry=r)
        self.kv_events = Counter("omni_proxy_kv_events", "KV events applied to the prefix index", ["instance", "type"], registry=r)
        self.prompt_tokens = Counter("omni_proxy_prompt_tokens", "prompt tokens routed", registry=r)
        self.matched_tokens = Counter("omni_proxy_prefix_matched_tokens", "prompt tokens found cached on the chosen instance", registry=r)
        self.dropped_fields = Counter("omni_proxy_dropped_fields", "client fields dropped before forwarding", ["field"], registry=r)
        self.instance_down = Counter("omni_proxy_instance_down", "times an instance was declared down", ["instance", "reason"], registry=r)
        self.failovers = Counter("omni_proxy_failovers", "attempts moved off an instance declared down", ["instance"], registry=r)
        self.offloaded = Counter("omni_proxy_offloaded_prompts", "request bodies prepared in a worker process", registry=r)
        self.ttft = Histogram("omni_proxy_ttft_seconds", "time to first byte of the completion", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("omni_proxy_tpot_seconds", "time per output chunk after the first (streams)", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("omni_proxy_e2e_seconds", "request latency", buckets=LATENCY_BUCKETS, registry=r)
        r.register(_SnapshotCollector(snapshot))
        self._children: dict[tuple, object] = {}

    def labelled(self, metric, *values: str):
        """``metric.labels(*values)``, kept: ``labels`` checks and locks on every call, and the
        per-request counters take the same few label sets over and over."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
