"""Soak: 10,000 requests through `omni-proxy serve` (PD) to `omni-proxy sim` processes that fault on
5 % of upstream attempts (every kind: 500, HTML 500, junk 200, stalls, hangs, resets, truncated
events), one of the two sim processes SIGSTOPped for 3 s partway. Every answer is checked
against the text the instance must have generated for its request id."""

import pytest

from proxy.sim.faults import KINDS
from proxy.stress.soak import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_soak_10000_requests_5_percent_faults_and_a_stopped_process_none_lost_none_hung():
    r = run(requests=10_000, concurrency=64, fault_rate=0.05, pause_s=3.0)
    print(f"soak: {r}")
    assert r["answered"] == 10_000
    assert r["lost"] == 0 and r["hung"] == 0, r
    assert r["within_bound"] == 10_000 and r["latency_s"]["max"] <= r["bound_s"]
    assert r["completed"] >= 0.97 * 10_000  # retries absorb what happens before the first byte
    injected = r["faults_injected"]
    assert all(injected[k] > 0 for k in KINDS), injected
    assert sum(injected[k] for k in KINDS) > 0.03 * 10_000  # the faults really happened
    proxy = r["proxy"]
    assert proxy["omni_proxy_instance_down_total"] >= 1 and proxy["omni_proxy_failovers_total"] > 0  # the pause
