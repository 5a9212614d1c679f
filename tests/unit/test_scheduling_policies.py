import pytest

from scheduling.load import LoadModel
from scheduling.policies import POLICIES, ClusterState, RequestInfo, make_policy, policy_options
from scheduling.prefix_index import PrefixIndex

BS = 16


def cluster(names, role="prefill"):
    loads = LoadModel(prior_intercept=0.01, prior_slope=1e-4)
    for n in names:
        loads.add(n, role)
    return ClusterState(loads=loads, index=PrefixIndex(), block_size=BS, now=100.0)


def req(tokens=320, keys=(), max_tokens=10, rid="r"):
    return RequestInfo(rid, tokens, max_tokens, tuple(keys), 0.0)


def test_names_and_unknown_policy_or_option():
    assert set(POLICIES) >= {"omni", "round_robin", "least_load", "cache_aware"}
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="round_robin.*bypass_tokens"):
        make_policy("round_robin", bypass_tokens=3)
    assert "bypass_tokens" in policy_options("omni")


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
    # a match under the threshold (3/20 blocks) goes to the least loaded
    s2 = cluster(["a", "b"])
    s2.index.insert_approx("b", keys[:3], now=0.0)
    s2.loads.acquire("b", 1, 1, 0.0)
    assert p.choose_prefill(req(320, keys), ["a", "b"], s2).instance == "a"
    # imbalance (b runs 4, a runs 0: 4 - 0 > 2 and 4 > 1.5 * 0) overrides the prefix
    for _ in range(4):
        s.loads.acquire("b", 1, 1, 0.0)
    c = p.choose_prefill(req(320, keys), ["a", "b"], s)
    assert (c.instance, c.reason) == ("a", "balance")


def test_omni_prefill_deepest_match_then_predicted_finish():
    s = cluster(["a", "b", "c"])
    keys = list(range(20))
    s.index.insert_approx("a", keys[:5], now=0.0)
    s.index.insert_approx("b", keys[:5], now=0.0)
    s.index.insert_approx("c", keys[:2], now=0.0)
    s.loads.acquire("a", 2000, 2000, 0.0)
    s.loads.acquire("b", 1000, 1000, 0.0)
    p = make_policy("omni")
    c = p.choose_prefill(req(320, keys), ["a", "b", "c"], s)
    assert (c.instance, c.reason, c.matched_blocks) == ("b", "prefix", 5)  # equal depth, b ends sooner
    # the learned model can flip the tie: b becomes slow per token
    for _ in range(50):
        s.loads["b"].model.observe(1000, 5.0)
        s.loads["b"].model.observe(3000, 15.0)
    assert p.choose_prefill(req(320, keys), ["a", "b", "c"], s).instance == "a"


def test_omni_prefill_no_match_goes_to_fewest_queued_tokens():
    s = cluster(["a", "b"])
    s.loads.acquire("a", 10, 10, 0.0)
    c = make_policy("omni").choose_prefill(req(320, [1, 2]), ["a", "b"], s)
    assert (c.instance, c.reason) == ("b", "load")


def test_omni_skips_instances_over_limits_and_holds_when_all_are():
    s = cluster(["a", "b"])
    keys = list(range(20))
    s.index.insert_approx("a", keys, now=0.0)
    p = make_policy("omni", prefill_max_tokens=1000, prefill_max_running=2)
    s.loads.acquire("a", 1000, 1000, 0.0)  # a at its token limit
    assert p.choose_prefill(req(320, keys), ["a", "b"], s).instance == "b"
    s.loads.acquire("b", 1, 1, 0.0)
    s.loads.acquire("b", 1, 1, 0.0)  # b at its running limit
    assert p.choose_prefill(req(320, keys), ["a", "b"], s) is None


def test_omni_decode_least_tokens_below_running_limit():
    s = cluster(["d1", "d2"], role="decode")
    p = make_policy("omni", decode_max_running=1)
    s.loads.acquire("d1", 0, 50, 0.0)
    assert p.choose_decode(req(), ["d1", "d2"], s).instance == "d2"
    s.loads.acquire("d2", 0, 10, 0.0)
    assert p.choose_decode(req(), ["d1", "d2"], s) is None
    p2 = make_policy("omni")
    assert p2.choose_decode(req(), ["d1", "d2"], s).instance == "d2"  # 10 < 50 tokens


def test_omni_collocated_uses_decode_running_limit():
    s = cluster(["a", "b"], role="collocated")
    p = make_policy("omni", decode_max_running=1)
    s.loads.acquire("a", 0, 5, 0.0)
    assert p.choose_collocated(req(), ["a", "b"], s).instance == "b"


def test_omni_bypass_short_or_mostly_cached_prompts():
    s = cluster(["d"], role="decode")
    p = make_policy("omni", bypass_tokens=64)
    assert p.bypass_prefill(req(64), ["d"], s)
    assert not p.bypass_prefill(req(65), ["d"], s)
    keys = list(range(10))  # 160 tokens
    s.index.insert_approx("d", keys[:7], now=0.0)  # 112 cached, 48 left
    assert p.bypass_prefill(req(160, keys), ["d"], s)
    assert not make_policy("omni", bypass_tokens=0).bypass_prefill(req(1), ["d"], s)
    assert not p.bypass_prefill(req(1), [], s)
    assert not make_policy("least_load").bypass_prefill(req(1), ["d"], s)
