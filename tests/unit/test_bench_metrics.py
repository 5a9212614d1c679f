"""Serving metrics against hand-computed cases (TTFT/TPOT/ITL/E2E, percentiles, SLO, goodput)."""

import math

import numpy as np
import pytest

from proxy.bench.metrics import (
    SLO,
    RequestRecord,
    added_latency,
    distribution,
    goodput_qpm,
    parse_slo,
    percentile,
    summarize,
)


def record(index, sent, chunks, end, tokens=None, ok=True, scheduled=None, error=None):
    r = RequestRecord(index, sent if scheduled is None else scheduled, sent)
    r.chunk_times = list(chunks)
    r.end = end
    r.output_tokens = len(chunks) if tokens is None else tokens
    r.ok = ok
    r.error = error
    return r


def test_per_request_metrics_by_hand():
    # sent at 10.0; chunks at 10.5, 10.6, 10.8, 11.1; done at 11.2; 4 tokens
    r = record(0, 10.0, [10.5, 10.6, 10.8, 11.1], 11.2)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.2)
    assert r.tpot == pytest.approx((1.2 - 0.5) / 3)  # (e2e - ttft) / (output - 1)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])


def test_tpot_uses_usage_tokens_not_chunks():
    # a router may merge chunks: 2 chunks carried 5 tokens (usage says 5)
    r = record(0, 0.0, [1.0, 2.0], 2.0, tokens=5)
    assert r.tpot == pytest.approx((2.0 - 1.0) / 4)
    assert r.itls == pytest.approx([1.0])


def test_one_token_output_has_no_tpot_and_failed_has_nothing():
    one = record(0, 0.0, [0.3], 0.3)
    assert one.ttft == pytest.approx(0.3) and one.tpot is None and one.itls == []
    failed = record(1, 0.0, [0.2], None, ok=False, error="HTTP 500")
    assert failed.ttft is None and failed.e2e is None and failed.tpot is None and failed.itls == []


def test_percentile_matches_numpy_linear():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 17, 100):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    # by hand: [1, 2, 3, 4]: p50 = 2.5, p90 = 3 + 0.7 = 3.7
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert percentile([4, 1, 3, 2], 90) == pytest.approx(3.7)
    assert math.isnan(percentile([], 50))
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_slo_met_rules():
    slo = SLO(ttft=1.0, tpot=0.1)
    assert slo.met(record(0, 0.0, [0.9, 0.95, 1.0], 1.0))         # ttft .9, tpot .05
    assert not slo.met(record(0, 0.0, [1.01, 1.02], 1.02))        # ttft over
    assert not slo.met(record(0, 0.0, [0.5, 0.8], 0.8))           # tpot .3 over
    assert slo.met(record(0, 0.0, [0.5], 0.5))                    # one token: only ttft counts
    assert not slo.met(record(0, 0.0, [0.1], None, ok=False))     # failed never meets


def test_summarize_counts_attainment_and_throughput():
    slo = SLO(ttft=1.0, tpot=0.2, attainment=0.9)
    recs = [
        record(0, 0.0, [0.5, 0.6, 0.7], 0.7),            # meets (ttft .5, tpot .1)
        record(1, 1.0, [2.5, 2.6], 2.6),                  # ttft 1.5: misses
        record(2, 2.0, [2.2, 2.9], 3.0),                  # ttft .2, tpot .8: misses
        record(3, 3.0, [], None, ok=False, error="HTTP 503: busy"),
    ]
    s = summarize(recs, slo, offered_rate=1.0)
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["slo_met"] == 1 and s["slo_attainment"] == pytest.approx(0.25)
    assert s["duration_s"] == pytest.approx(3.0)           # first sent 0.0 .. last end 3.0
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(7 / 3.0)
    assert s["ttft"]["p50"] == pytest.approx(0.5)           # of [0.2, 0.5, 1.5]
    assert s["ttft"]["mean"] == pytest.approx((0.5 + 1.5 + 0.2) / 3)
    assert s["tpot"]["p50"] == pytest.approx(float(np.percentile([0.1, 0.1, 0.8], 50)))
    assert s["itl"]["p99"] == pytest.approx(float(np.percentile([0.1, 0.1, 0.1, 0.7], 99)))
    assert s["e2e"]["p90"] == pytest.approx(float(np.percentile([0.7, 1.6, 1.0], 90)))
    assert s["errors"] == {"HTTP 503: busy": 1}


def test_goodput_is_highest_passing_rate_per_minute():
    points = [(0.5, 1.0), (1.0, 0.95), (1.5, 0.9), (2.0, 0.7)]
    assert goodput_qpm(points, 0.9) == pytest.approx(90.0)
    # a pass above a failure still counts (highest passing rate), order does not matter
    assert goodput_qpm([(3.0, 0.91), (1.0, 0.95), (2.0, 0.5)], 0.9) == pytest.approx(180.0)
    assert goodput_qpm([(1.0, 0.89)], 0.9) == 0.0
    assert goodput_qpm([], 0.9) == 0.0


def test_added_latency_is_percentile_difference():
    through = {"ttft": {"p50": 0.012, "p99": 0.030}, "e2e": {"p50": 0.020, "p99": 0.050}}
    direct = {"ttft": {"p50": 0.010, "p99": 0.021}, "e2e": {"p50": 0.019, "p99": None}}
    a = added_latency(through, direct)
    assert a["ttft"]["p50"] == pytest.approx(0.002) and a["ttft"]["p99"] == pytest.approx(0.009)
    assert a["e2e"]["p50"] == pytest.approx(0.001) and a["e2e"]["p99"] is None


def test_parse_slo():
    assert parse_slo("ttft=2.0,tpot=0.05") == SLO(2.0, 0.05, 0.9)
    assert parse_slo("tpot=0.1") == SLO(2.0, 0.1, 0.9)
    assert parse_slo("ttft=1,tpot=0.2,attainment=0.95") == SLO(1.0, 0.2, 0.95)
    for bad, needle in (("ttft", "ttft=S"), ("latency=1", "ttft=S"), ("ttft=x", "number"),
                        ("ttft=-1", "positive"), ("attainment=1.5", "at most 1")):
        with pytest.raises(ValueError, match=needle):
            parse_slo(bad)
