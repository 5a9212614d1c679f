"""Policy decisions against hand-computed cases: the simple policies, and ``omni`` given learned
models (learned capacity, the collocated choice by predicted TTFT within the TPOT target, PD
prefill/decode choice, bypass by predicted TTFT, delayed release, hooks)."""

import pytest

from scheduling.load import KV_SCALE, PREFILL_SCALE, DecodeTimeModel, LoadModel
from scheduling.policies import POLICIES, ClusterState, Observation, RequestInfo, make_policy, policy_options
from scheduling.predict import tpot_capacity
from scheduling.prefix_index import PrefixIndex
from scheduling.slo import SLOTarget

BS = 16
SLO = SLOTarget(ttft=1.0, tpot=0.1)


def cluster(names, role="prefill", loads=None):
    loads = loads or LoadModel(prior_intercept=0.01, prior_slope=1e-4)
    for n in names:
        loads.add(n, role)
    return ClusterState(loads=loads, index=PrefixIndex(), block_size=BS, now=100.0)


def req(tokens=320, keys=(), max_tokens=10, rid="r", arrived=100.0):
    return RequestInfo(rid, tokens, max_tokens, tuple(keys), arrived)


def teach(loads, role, *, intercept=0.01, slope=1e-4, step=0.02, per_seq=0.002, per_kv=0.0, per_prefill=0.0):
    """Give ``role`` learned models with these coefficients (as if observed: no prior borrowing)."""
    pm, dm = loads.models_of(role)
    pm.intercept, pm.slope, pm.observations = intercept, slope, 10
    dm.fit.theta = [step, per_seq, per_kv * KV_SCALE, per_prefill * PREFILL_SCALE]
    dm.fit.samples = 10


def occupy(loads, name, n, prefill=0, kv_each=0, now=100.0):
    return [loads.acquire(name, prefill if k == 0 else 0, kv_each, now) for k in range(n)]


# -- the simple policies ---------------------------------------------------------------------
def test_names_and_unknown_policy_or_option():
    assert set(POLICIES) >= {"omni", "round_robin", "least_load", "cache_aware"}
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="round_robin.*bypass_tokens"):
        make_policy("round_robin", bypass_tokens=3)
    with pytest.raises(ValueError, match="ttft_share must be in"):
        make_policy("omni", ttft_share=0)
    with pytest.raises(ValueError, match="decode_max_running must be positive"):
        make_policy("omni", decode_max_running=0)
    assert {"bypass_tokens", "ttft_share", "margin", "aging"} <= set(policy_options("omni"))
    assert not {"balance", "cache_share"} & set(policy_options("omni"))  # no band or share to calibrate
    assert make_policy("omni", slo=SLO).slo == SLO and make_policy("omni").slo == SLOTarget()


def test_round_robin_cycles_each_stage_independently():
    s = cluster(["a", "b", "c"])
    p = make_policy("round_robin")
    picks = [p.choose_prefill(req(), ["a", "b", "c"], s).instance for _ in range(4)]
    assert picks == ["a", "b", "c", "a"]
    assert p.choose_decode(req(), ["x", "y"], s).instance == "x"
    assert p.choose_prefill(req(), [], s) is None


def test_least_load_uses_tokens_then_running():
    s = cluster(["a", "b"])
    s.loads.acquire("a", 500, 500, 0.0)
    s.loads.acquire("b", 100, 100, 0.0)
    s.loads.acquire("b", 100, 100, 0.0)
    p = make_policy("least_load")
    assert p.choose_prefill(req(), ["a", "b"], s).instance == "b"  # 200 < 500 tokens
    s.loads.acquire("b", 300, 300, 0.0)
    assert p.choose_prefill(req(), ["a", "b"], s).instance == "a"  # 500 == 500, a runs fewer
    assert p.choose_decode(req(), ["a", "b"], s).instance == "a"


def test_least_load_rotates_between_equals():
    s = cluster(["a", "b"])
    p = make_policy("least_load")
    assert [p.choose_decode(req(), ["a", "b"], s).instance for _ in range(4)] == ["a", "b", "a", "b"]


def test_cache_aware_prefers_prefix_until_imbalanced():
    s = cluster(["a", "b"])
    keys = list(range(20))  # 20 blocks = 320 tokens
    s.index.insert_approx("b", keys[:10], now=0.0)
    p = make_policy("cache_aware", cache_threshold=0.4, balance_abs=2, balance_rel=1.5)
    c = p.choose_prefill(req(320, keys), ["a", "b"], s)
    assert (c.instance, c.reason, c.matched_blocks) == ("b", "prefix", 10)
    s2 = cluster(["a", "b"])
    s2.index.insert_approx("b", keys[:3], now=0.0)  # under the threshold: least loaded
    s2.loads.acquire("b", 1, 1, 0.0)
    assert p.choose_prefill(req(320, keys), ["a", "b"], s2).instance == "a"
    for _ in range(4):  # b runs 4, a 0: 4 - 0 > 2 and 4 > 1.5 * 0
        s.loads.acquire("b", 1, 1, 0.0)
    c = p.choose_prefill(req(320, keys), ["a", "b"], s)
    assert (c.instance, c.reason) == ("a", "balance")


# -- omni: learned capacity and the collocated choice ------------------------------------------
def test_learned_capacity_from_observations():
    # an engine whose TPOT is 25 ms + 2.5 ms per running sequence: within 100 ms it serves
    # (0.1 - 0.025) / 0.0025 = 30 sequences
    loads = LoadModel()
    load = loads.add("c", "collocated")
    load.decode = DecodeTimeModel(decay=1.0)
    for _ in range(5):
        for n in range(1, 41):
            load.decode.observe(n, 0.0, 0.0, 0.025 + 0.0025 * n)
    assert load.decode.step_seconds(30, 0) == pytest.approx(0.1, rel=1e-3)
    # targets between integers, so the last 0.1 % of fit error cannot flip the floor:
    # (0.101 - 0.025) / 0.0025 = 30.4 and (0.0505 - 0.025) / 0.0025 = 10.2
    assert tpot_capacity(load, loads.instances, SLOTarget(1.0, 0.101), margin_z=0.0, now=0.0) == 30
    assert tpot_capacity(load, loads.instances, SLOTarget(2.0, 0.0505), margin_z=0.0, now=0.0) == 10


def test_capacity_counts_context_prefill_rate_and_margin():
    loads = LoadModel()
    s = cluster(["c"], role="collocated", loads=loads)
    teach(loads, "collocated", step=0.02, per_seq=0.002, per_kv=4e-6, per_prefill=1e-4)
    occupy(loads, "c", 10, kv_each=500)  # mean context 500: 2 ms + 2 ms per sequence
    assert tpot_capacity(loads["c"], loads.instances, SLO, 0.0, 100.0) == 20  # (0.1 - 0.02) / 0.004
    t = loads.acquire("c", 1000, 0, 100.0)
    t.prefill_done(100.0)  # 1000 prefill tokens just finished: 200 tokens/s, 2 % of the time
    # (0.1 * 0.98 - 0.02) / 0.004 = 19.5 -> 19 (the new ticket counts as running: context 5000/11)
    context = 5000 / 11
    expected = int((0.1 * (1 - 1e-4 * 200) - 0.02) / (0.002 + 4e-6 * context))
    assert tpot_capacity(loads["c"], loads.instances, SLO, 0.0, 100.0) == expected
    loads.models_of("collocated")[1].fit._res_sq, loads.models_of("collocated")[1].fit._res_w = 0.01 ** 2, 1.0
    # one error spread (10 ms) of margin: (0.09 * 0.98 - 0.02) / per_seq
    assert tpot_capacity(loads["c"], loads.instances, SLO, 1.0, 100.0) == int(
        (0.09 * 0.98 - 0.02) / (0.002 + 4e-6 * context))


def test_omni_collocated_prefers_the_cache_holder_when_the_hit_saves_more_than_its_queue_costs():
    loads = LoadModel()
    s = cluster(["a", "b"], role="collocated", loads=loads)
    # first token 0.02 s + 0.5 ms a queued token; every decode step 20 ms whatever the load, so
    # the decode terms are equal everywhere and the trade is prefill work against queue
    teach(loads, "collocated", intercept=0.02, slope=5e-4, step=0.02, per_seq=0.0)
    keys = list(range(20))                          # 320 tokens in 20 blocks of 16
    s.index.insert_approx("a", keys[:16], now=0.0)  # a holds 256 of them: 64 left to compute there
    occupy(loads, "a", 1, prefill=150)              # a: 150 tokens queued, one request there; b idle
    p = make_policy("omni", slo=SLO)
    # a: 0.02 + 5e-4 * (150 + 64) = 0.127 s to the first token, + 5e-4 * 64 = 0.032 s of stall on
    # the request running there = 0.159; b: 0.02 + 5e-4 * 320 = 0.18. The hit saves 256 tokens
    # (0.128 s); the queue and the stall cost 0.107 s: the holder
    c = p.choose_collocated(req(320, keys), ["a", "b"], s)
    assert (c.instance, c.reason, c.matched_blocks) == ("a", "prefix", 16)
    # 100 more tokens queued there: 0.177 + 0.032 = 0.209 > 0.18, the queue costs more than the hit saves
    occupy(loads, "a", 1, prefill=100)
    loads["a"].running -= 1  # (keep one request running there, as before)
    c = p.choose_collocated(req(320, keys), ["a", "b"], s)
    assert (c.instance, c.reason, c.matched_blocks) == ("b", "load", 0)


def test_omni_collocated_counts_what_a_placement_costs_the_requests_already_there():
    loads = LoadModel()
    s = cluster(["a", "b"], role="collocated", loads=loads)
    teach(loads, "collocated", intercept=0.02, slope=5e-4, step=0.02, per_seq=0.002)
    occupy(loads, "a", 10)
    occupy(loads, "b", 4)
    p = make_policy("omni", slo=SLO)
    # no prefix anywhere, nothing queued: equal first tokens (0.18 s); the decode costs differ.
    # a: 10 * (0.02 + 0.002 * 11) + 10 requests * 10 steps * 0.002 = 0.42 + 0.2, plus the
    # prefill's stall 10 * 0.16; b: 10 * 0.03 + 4 * 10 * 0.002 + 4 * 0.16: b
    assert p.choose_collocated(req(320), ["a", "b"], s).instance == "b"
    # a prefix held by the busier instance: 304 of 320 tokens cached on a saves its first token
    # 0.152 s and the stall 10 * 5e-4 * 304 = 1.52 s against b's 4 * 0.16 = 0.64: a
    keys = list(range(20))
    s.index.insert_approx("a", keys[:19], now=0.0)
    c = p.choose_collocated(req(320, keys), ["a", "b"], s)
    assert (c.instance, c.matched_blocks) == ("a", 19)


def test_omni_collocated_weighs_tpot_in_the_cost_not_as_a_cut():
    loads = LoadModel()
    s = cluster(["a", "b"], role="collocated", loads=loads)
    # a decode step costs 90 ms + 0.2 ms a sequence: the 100 ms target holds up to 50 sequences
    teach(loads, "collocated", intercept=0.02, slope=5e-4, step=0.09, per_seq=0.0002)
    keys = list(range(200))                     # a long prompt (3200 tokens), all but one block cached on a
    s.index.insert_approx("a", keys[:199], now=0.0)
    occupy(loads, "a", 50)                      # TPOT there with this request: 0.09 + 0.0002 * 51 = 0.1002 > 0.1
    p = make_policy("omni", slo=SLO, margin=0.0)
    # a: first token 0.02 + 5e-4 * 16 = 0.028, decode 10 * (0.1002 + 50 * 0.0002) = 1.102, stall
    # 50 * 5e-4 * 16 = 0.4: 1.53 s; b: first token 0.02 + 5e-4 * 3200 = 1.62, decode 10 * 0.0902:
    # 2.52 s. Over the TPOT target is no cut: a
    assert p.choose_collocated(req(3200, keys), ["a", "b"], s).instance == "a"
    # a 320-token prompt, 304 of them cached on a: a still 0.028 + 1.102 + 0.4 = 1.53 s, b now
    # 0.18 + 0.902 = 1.08 s: the load on a outweighs what its cache saves
    c = p.choose_collocated(req(320, keys[:20]), ["a", "b"], s)
    assert (c.instance, c.matched_blocks) == ("b", 0)


def test_omni_collocated_equal_forecasts_go_to_the_less_busy_then_rotate():
    loads = LoadModel()
    s = cluster(["a", "b"], role="collocated", loads=loads)
    teach(loads, "collocated")
    occupy(loads, "a", 2)
    p = make_policy("omni", slo=SLO)
    assert p.choose_collocated(req(320), ["a", "b"], s).instance == "b"
    occupy(loads, "b", 2)
    assert [p.choose_collocated(req(320), ["a", "b"], s).instance for _ in range(4)] in (
        ["a", "b", "a", "b"], ["b", "a", "b", "a"])


def test_omni_delayed_release_holds_when_every_first_token_is_late():
    loads = LoadModel()
    s = cluster(["a", "b"], role="collocated", loads=loads)
    teach(loads, "collocated", intercept=0.05, slope=1e-3)  # 0.05 + 1 ms per queued token
    p = make_policy("omni", slo=SLO)  # ttft_share 0.5: first token within 0.5 s
    occupy(loads, "a", 1, prefill=300)  # a: 0.05 + 0.001 * (300 + 320) = 0.67 s
    occupy(loads, "b", 1, prefill=100)  # b: 0.05 + 0.001 * (100 + 320) = 0.47 s
    assert p.choose_collocated(req(320), ["a", "b"], s).instance == "b"
    occupy(loads, "b", 1, prefill=100)  # b: 0.57 s too
    assert p.choose_collocated(req(320), ["a", "b"], s) is None
    # a short prompt still fits on both (a: 0.05 + 0.4 = 0.45 s, b: 0.35 s); a runs fewer requests
    # for its prefill to stall (1 x 0.1 s against 2 x 0.1 s) and its decode to slow
    assert p.choose_collocated(req(100), ["a", "b"], s).instance == "a"
    assert make_policy("omni", slo=SLOTarget(2.0, 0.1)).choose_collocated(req(320), ["a", "b"], s) is not None


# -- omni: PD --------------------------------------------------------------------------------
def test_omni_prefill_earliest_predicted_completion_counts_the_prefix():
    loads = LoadModel()
    s = cluster(["p1", "p2"], role="prefill", loads=loads)
    teach(loads, "prefill", intercept=0.02, slope=5e-4)
    keys = list(range(20))
    s.index.insert_approx("p1", keys[:10], now=0.0)  # p1 caches 160 of the 320 tokens
    occupy(loads, "p1", 1, prefill=200)
    p = make_policy("omni", slo=SLO)
    # p1: 0.02 + 5e-4 * (200 + 160) = 0.20 s; p2: 0.02 + 5e-4 * 320 = 0.18 s
    c = p.choose_prefill(req(320, keys), ["p1", "p2"], s)
    assert (c.instance, c.matched_blocks) == ("p2", 0)
    s2 = cluster(["p1", "p2"], role="prefill", loads=LoadModel())
    teach(s2.loads, "prefill", intercept=0.02, slope=5e-4)
    s2.index.insert_approx("p1", keys[:10], now=0.0)
    occupy(s2.loads, "p1", 1, prefill=100)  # p1: 0.02 + 5e-4 * 260 = 0.15 s < 0.18 s
    c = p.choose_prefill(req(320, keys), ["p1", "p2"], s2)
    assert (c.instance, c.reason, c.matched_blocks) == ("p1", "prefix", 10)


def test_omni_decode_by_predicted_tpot_not_request_count():
    loads = LoadModel()
    s = cluster(["d1", "d2"], role="decode", loads=loads)
    teach(loads, "decode", step=0.02, per_seq=0.002, per_kv=4e-6)
    occupy(loads, "d1", 10, kv_each=300)  # 0.02 + 0.002 * 11 + 4e-6 * (3000 + 320) = 0.0553
    occupy(loads, "d2", 12, kv_each=80)   # 0.02 + 0.002 * 13 + 4e-6 * (960 + 320) = 0.0511
    c = make_policy("omni", slo=SLO).choose_decode(req(320), ["d1", "d2"], s)
    assert c.instance == "d2"
    # over the TPOT target everywhere: still placed (capacity steers, never holds), the lowest
    occupy(loads, "d1", 30)
    occupy(loads, "d2", 30)
    assert make_policy("omni", slo=SLO).choose_decode(req(320), ["d1", "d2"], s).instance == "d2"
    # a hard cap does hold
    assert make_policy("omni", slo=SLO, decode_max_running=40).choose_decode(req(320), ["d1", "d2"], s) is None


def pd_cluster():
    loads = LoadModel()
    s = cluster(["p"], role="prefill", loads=loads)
    loads.add("d", "decode")
    teach(loads, "prefill", intercept=0.02, slope=5e-4)
    teach(loads, "decode", intercept=0.02, slope=5e-4, step=0.02, per_seq=0.002, per_prefill=5e-4)
    return s


def test_omni_bypass_by_predicted_ttft():
    s = pd_cluster()
    p = make_policy("omni", slo=SLO)
    loads = s.loads
    occupy(loads, "d", 10)
    # the prefill instance has 1000 tokens queued: via prefill 0.02 + 5e-4 * 1200 = 0.62 s + a
    # decode step (0.02 + 0.002 * 11 = 0.042); on the decode instance 0.02 + 5e-4 * 200 = 0.12 s:
    # 0.542 s saved, more than the 5e-4 * 200 = 0.1 s that prefill stalls the decodes there
    occupy(loads, "p", 1, prefill=1000)
    assert p.bypass_prefill(req(200, rid="x"), ["d"], s, ["p"])
    assert p.choose_decode(req(200, rid="x"), ["d"], s).instance == "d"
    # a lightly loaded prefill instance and a long prompt: 0.02 + 5e-4 * 1100 = 0.57 + 0.042 vs
    # on the decode instance, where 40 running requests make its step 0.1 s: over the TPOT
    # target with the extra prefill, so no bypass
    s2 = pd_cluster()
    occupy(s2.loads, "d", 40)
    occupy(s2.loads, "p", 1, prefill=100)
    assert not p.bypass_prefill(req(1000), ["d"], s2, ["p"])
    # fixed rule when asked for; 0 disables
    assert make_policy("omni", bypass_tokens=64).bypass_prefill(req(64), ["d"], s2, ["p"])
    assert not make_policy("omni", bypass_tokens=64).bypass_prefill(req(65), ["d"], s2, ["p"])
    assert not make_policy("omni", bypass_tokens=0).bypass_prefill(req(1), ["d"], s, ["p"])
    assert not p.bypass_prefill(req(1), [], s, ["p"])
    assert not make_policy("least_load").bypass_prefill(req(1), ["d"], s, ["p"])


def test_omni_bypass_counts_the_decode_side_prefix():
    s = pd_cluster()
    keys = list(range(20))
    s.index.insert_approx("d", keys[:18], now=0.0)  # 288 of 320 tokens cached on the decode instance
    occupy(s.loads, "d", 5)
    # prefill idle: 0.02 + 5e-4 * 320 = 0.18 (+ step 0.032); decode side 0.02 + 5e-4 * 32 = 0.036:
    # 0.176 s saved against a 0.016 s stall
    p = make_policy("omni", slo=SLO)
    assert p.bypass_prefill(req(320, keys), ["d"], s, ["p"])
    s.index.cleared("d")
    # nothing cached: 0.032 s saved (one decode step) against a 0.16 s stall of 5 decodes: PD
    assert not p.bypass_prefill(req(320, keys), ["d"], s, ["p"])


# -- hooks and holding -------------------------------------------------------------------------
def obs(ticket, stage, at, ok=True, tokens=None, instance="c"):
    return Observation(req(), instance, stage, ticket.sent_at, at, ok, None, tokens, ticket)


def test_hooks_feed_the_models_only_from_what_measures_them():
    loads = LoadModel()
    loads.add("c", "collocated")
    p = make_policy("omni")
    pm, dm = loads.models_of("collocated")
    t = loads.acquire("c", 100, 100, now=0.0, max_tokens=11)
    p.on_first_byte(obs(t, "collocated", 0.3))  # dispatch -> first token with 100 queued tokens
    assert pm.observations == 1 and loads["c"].prefill_tokens == 0 and t.first_token_at == 0.3
    t.grow(10)
    p.on_complete(obs(t, "collocated", 1.3, tokens=11))  # 10 gaps in 1 s: TPOT 0.1
    assert dm.observations == 1
    p.on_complete(obs(t, "collocated", 1.3, ok=False, tokens=11))  # a broken stream measures nothing
    assert (pm.observations, dm.observations) == (1, 1)
    # a non-streaming answer: the proxy marks its ticket's prefill done when the whole answer
    # is in, and reports only on_complete: neither model learns from its latency
    t4 = loads.acquire("c", 100, 100, now=2.0, max_tokens=11)
    t4.prefill_done(3.0)
    p.on_complete(obs(t4, "collocated", 3.0, tokens=11))
    assert (pm.observations, dm.observations) == (1, 1)
    # a decode leg of PD (KV from a prefill, nothing prefilled here): no prefill-time sample
    loads.add("d", "decode")
    t2 = loads.acquire("d", 0, 100, now=0.0)
    p.on_first_byte(obs(t2, "decode", 0.05, instance="d"))
    assert loads.models_of("decode")[0].observations == 0
    loads.add("p", "prefill")
    t3 = loads.acquire("p", 200, 200, now=0.0)
    p.on_prefill_done(obs(t3, "prefill", 0.2, instance="p"))
    assert loads.models_of("prefill")[0].observations == 1
    # policies without models ignore observations (the proxy does not even build them)
    assert make_policy("round_robin").on_first_byte(obs(t, "collocated", 0.3)) is None


def test_omni_held_service_and_order():
    loads = LoadModel()
    s = cluster(["a"], role="collocated", loads=loads)
    teach(loads, "collocated", slope=1e-3)
    keys = list(range(20))
    s.index.insert_approx("a", keys[:10], now=0.0)
    p = make_policy("omni", aging=1.0)
    h = p.held("collocated", req(320, keys, arrived=99.0), s)
    assert h.service_s == pytest.approx(1e-3 * 160)  # the uncached half at 1 ms a token
    long_old = p.held("collocated", req(900, arrived=99.0), s)   # service 0.9, waited 1.0: key -0.1
    short_new = p.held("collocated", req(100, arrived=100.0), s)  # service 0.1, waited 0: key 0.1
    order = p.hold_order("collocated")
    assert order([long_old, short_new], 100.0) == [0, 1]
    assert make_policy("omni", aging=0.5).hold_order("collocated")([long_old, short_new], 100.0) == [1, 0]
    assert p.held("decode", req(320), s).service_s == 0.0
