"""Prometheus metrics of one proxy (its own registry, so several proxies fit in one process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from proxy.server.app import ProxyServer

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)


class _StateCollector:
    """Per-instance load, health and queue gauges, read from the proxy at scrape time."""

    def __init__(self, server: "ProxyServer"):
        self.server = server

    def collect(self):
        s = self.server
        running = GaugeMetricFamily("omni_proxy_instance_running", "requests in flight to the instance", labels=["instance", "role"])
        prefill = GaugeMetricFamily("omni_proxy_instance_prefill_tokens", "uncached prompt tokens sent and not yet prefilled", labels=["instance", "role"])
        kv_tokens = GaugeMetricFamily("omni_proxy_instance_kv_tokens", "KV tokens of requests in flight", labels=["instance", "role"])
        healthy = GaugeMetricFamily("omni_proxy_instance_usable", "1 if the circuit breaker lets requests through", labels=["instance", "role"])
        index = GaugeMetricFamily("omni_proxy_instance_index_blocks", "prefix-index blocks attributed to the instance", labels=["instance", "role"])
        slope = GaugeMetricFamily("omni_proxy_instance_prefill_seconds_per_token", "learned prefill-time slope", labels=["instance", "role"])
        now = s.now()
        for inst in list(s.registry.instances.values()):
            labels = [inst.url, inst.role]
            load = s.loads.instances.get(inst.url)
            if load is not None:
                running.add_metric(labels, load.running)
                prefill.add_metric(labels, load.prefill_tokens)
                kv_tokens.add_metric(labels, load.kv_tokens)
                slope.add_metric(labels, load.model.slope)
            healthy.add_metric(labels, 1.0 if inst.breaker.usable(now, s.health_checked) else 0.0)
            index.add_metric(labels, s.index.size(inst.url))
        queue = GaugeMetricFamily("omni_proxy_held_requests", "requests held in the proxy", labels=["stage"])
        for stage, q in s.queues.items():
            queue.add_metric([stage], len(q))
        return [running, prefill, kv_tokens, healthy, index, slope, queue]


class ProxyMetrics:
    def __init__(self, server: "ProxyServer"):
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
        self.ttft = Histogram("omni_proxy_ttft_seconds", "time to first byte of the completion", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("omni_proxy_tpot_seconds", "time per output chunk after the first (streams)", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("omni_proxy_e2e_seconds", "request latency", buckets=LATENCY_BUCKETS, registry=r)
        r.register(_StateCollector(server))

    def render(self) -> bytes:
        return generate_latest(self.registry)
