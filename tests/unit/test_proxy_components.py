import asyncio

import pytest

from proxy.server.config import ProxyConfig, parse_kv_events
from proxy.server.errors import NoCapacity, NoInstance
from proxy.server.holding import HoldQueue
from proxy.server.instances import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Instance, Registry
from proxy.server.kv_subscriber import KVEventSubscriber
from proxy.sim.cache import BlockCache
from proxy.sim.faults import FaultPlan
from proxy.sim.profile import SimProfile
from proxy.wire import kv_events as kv
from scheduling.block_hash import to_key
from scheduling.prefix_index import PrefixIndex
from scheduling.queue_order import Held, fifo_order, prefill_order


# -- circuit breaker and the down verdict ---------------------------------------------------------
def test_breaker_opens_after_consecutive_failures_then_one_trial_at_a_time():
    b = CircuitBreaker(failures=3, cooldown_s=5.0)
    assert not b.record_failure(0.0) and not b.record_failure(0.1)
    b.record_success(0.2)  # resets the count
    b.record_failure(1.0)
    b.record_failure(1.1)
    assert b.usable(1.2)
    assert b.record_failure(1.2)  # opened now
    assert b.state == OPEN and not b.usable(1.3) and not b.usable(6.1)
    assert b.usable(6.2) and b.state == HALF_OPEN  # cooldown over: a trial may go
    b.dispatched()
    assert not b.usable(6.2)  # only one trial at a time
    b.end_trial()  # that trial ended without a verdict (client left)
    assert b.usable(6.3)
    b.dispatched()
    b.record_success(6.4)
    assert b.state == CLOSED and b.usable(6.4) and b.consecutive == 0


def test_breaker_failed_trial_reopens_with_doubled_cooldown_up_to_the_cap():
    b = CircuitBreaker(failures=1, cooldown_s=2.0, max_cooldown_s=6.0)
    b.record_failure(0.0)
    assert not b.usable(1.0) and b.usable(2.0) and b.state == HALF_OPEN
    b.dispatched()
    assert b.record_failure(2.0)  # trial failed: open again, twice as long
    assert b.state == OPEN and b.open_until == pytest.approx(6.0)
    assert b.usable(6.0)
    b.record_failure(6.0)
    assert b.open_until == pytest.approx(12.0)  # 4 s
    assert b.usable(12.0)
    b.record_failure(12.0)
    assert b.open_until == pytest.approx(18.0)  # capped at 6 s
    assert b.trips == 4


def test_probes_declare_down_and_up_without_touching_the_request_breaker():
    downs = []
    reg = Registry(on_down=lambda url, why: downs.append((url, why)), health_misses=3)
    inst = Instance("http://a:1", "collocated", breaker=CircuitBreaker(failures=2, cooldown_s=1.0))
    reg.add(inst)
    reg.probed(inst.url, False, "unanswered")
    reg.probed(inst.url, False, "unanswered")
    assert reg.usable("collocated", 0.0) == [inst.url] and not downs
    reg.probed(inst.url, True)
    reg.probed(inst.url, False, "x")
    reg.probed(inst.url, False, "x")
    assert not inst.down  # not in a row
    reg.probed(inst.url, False, "x")
    assert inst.down and reg.usable("collocated", 0.0) == [] and len(downs) == 1 and "3 health probes" in downs[0][1]
    reg.probed(inst.url, False, "x")
    assert len(downs) == 1  # declared once
    reg.probed(inst.url, True)
    assert not inst.down and reg.usable("collocated", 0.0) == [inst.url]
    # requests failing while /health passes: the breaker opens and passing probes do not close it
    reg.request_failed(inst.url, 0.0, "http_5xx")
    reg.request_failed(inst.url, 0.1, "http_5xx")
    assert inst.breaker.state == OPEN and len(downs) == 2 and "circuit opened" in downs[1][1]
    for _ in range(5):
        reg.probed(inst.url, True)
    assert inst.breaker.state == OPEN and reg.usable("collocated", 0.5) == []
    assert reg.usable("collocated", 1.1) == [inst.url] and inst.breaker.state == HALF_OPEN


# -- hold queue ---------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_hold_queue_releases_in_omni_prefill_order_and_times_out():
    q = HoldQueue(prefill_order)
    capacity = {"free": 0}
    served = []

    def placer(name):
        def try_place():
            if capacity["free"] > 0:
                capacity["free"] -= 1
                served.append(name)
                return name
            return None
        return try_place

    long_req = asyncio.ensure_future(q.place(Held(4000, 1, 0.0), placer("long"), 5, now=0.0))
    short_req = asyncio.ensure_future(q.place(Held(100, 1, 0.0), placer("short"), 5, now=0.0))
    await asyncio.sleep(0)
    assert len(q) == 2
    capacity["free"] = 1
    q.kick(now=0.01)
    assert await short_req == "short"
    capacity["free"] = 1
    q.kick(now=0.02)
    assert await long_req == "long"
    assert served == ["short", "long"]
    with pytest.raises(NoCapacity, match="held 0.05 s"):
        await q.place(Held(1, 1, 0.0), placer("never"), 0.05, now=0.0)
    assert len(q) == 0


@pytest.mark.asyncio
async def test_hold_queue_passes_no_instance_and_returns_orphans():
    q = HoldQueue(fifo_order)

    def none_left():
        raise NoInstance("no usable decode instance")

    with pytest.raises(NoInstance):
        await q.place(Held(1, 1, 0.0), none_left, 1, now=0.0)
    orphans = []
    gate = {"open": False}
    waiter = asyncio.ensure_future(q.place(Held(1, 1, 0.0), lambda: "slot" if gate["open"] else None, 5, 0.0,
                                           on_orphan=orphans.append))
    await asyncio.sleep(0)
    gate["open"] = True
    q.kick(0.0)  # placed ...
    waiter.cancel()  # ... but the client left in the same instant
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert orphans == ["slot"]


# -- KV event subscriber (no socket: frames handed in) ----------------------------------------------
def test_subscriber_applies_events_and_counts_gaps():
    index = PrefixIndex()
    sub = KVEventSubscriber("http://a", "tcp://127.0.0.1:1", index, block_size=16)
    stored = kv.EventBatch(0.0, [kv.BlockStored([b"\x01" * 32, b"\x02" * 32], None, [0] * 32, 16)])
    sub.handle(kv.frames(b"", 0, stored))
    assert index.match([to_key(b"\x01" * 32), to_key(b"\x02" * 32)]) == {"http://a": 2}
    sub.handle(kv.frames(b"", 2, kv.EventBatch(0.0, [kv.BlockRemoved([to_key(b"\x02" * 32)])])))  # int form
    assert sub.gaps == 1
    assert index.match([to_key(b"\x01" * 32), to_key(b"\x02" * 32)]) == {"http://a": 1}
    sub.handle(kv.frames(b"", 3, kv.EventBatch(0.0, [kv.AllBlocksCleared()])))
    assert index.size("http://a") == 0
    with pytest.raises(kv.KVEventDecodeError, match="3 frames"):
        sub.handle([b"", b"x"])


# -- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="x"), "--mode must be one of pd, collocated, got 'x'"),
    (dict(mode="pd", prefill=["http://a"]), "--mode pd needs at least one --decode URL"),
    (dict(mode="collocated"), "--mode collocated needs at least one --instance URL"),
    (dict(mode="collocated", instances=["http://a"], decode=["http://b"]), "--prefill/--decode are for --mode pd"),
    (dict(mode="collocated", instances=["ftp://a"]), "must start with http"),
    (dict(mode="collocated", instances=["http://a", "http://a/"]), "more than once: http://a"),
    (dict(mode="collocated", instances=["http://a"], policy="best"), "--policy must be one of"),
    (dict(mode="collocated", instances=["http://a"], policy="round_robin", policy_options={"bypass_tokens": 1}),
     "round_robin"),
    (dict(mode="collocated", instances=["http://a"], kv_events={"http://b": "tcp://x:1"}), "not one of the instances"),
    (dict(mode="collocated", instances=["http://a"], kv_events={"http://a": "x:1"}), "must be a ZMQ address"),
    (dict(mode="collocated", instances=["http://a"], block_size=0), "--block-size must be positive"),
    (dict(mode="collocated", instances=["http://a"], retries=-1), "--retries must not be negative"),
])
def test_config_errors_name_flag_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProxyConfig(**kwargs).check()


def test_parse_kv_events():
    assert parse_kv_events(["http://a:1=tcp://a:2"]) == {"http://a:1": "tcp://a:2"}
    with pytest.raises(ValueError, match="URL=ENDPOINT"):
        parse_kv_events(["http://a:1"])


# -- simulator pieces ---------------------------------------------------------------------------------
def test_block_cache_lru_eviction_and_events():
    cache = BlockCache(num_blocks=4, block_size=2)
    assert cache.acquire([], 2)
    assert cache.commit([b"a", b"b"], None, [1, 2, 3, 4]) == [b"a", b"b"]
    stored = cache.take_events()[0]
    assert stored.block_hashes == [b"a", b"b"] and stored.token_ids == [1, 2, 3, 4] and stored.parent_block_hash is None
    cache.release([b"a", b"b"], 0, cache.generation)
    assert cache.free_blocks() == 2 and cache.match([b"a", b"b", b"c"]) == 2
    assert cache.acquire([b"a"], 3)  # reuse a, evict b (the only free cached one) for room
    removed = cache.take_events()[0]
    assert isinstance(removed, kv.BlockRemoved) and removed.block_hashes == [b"b"]
    assert not cache.acquire([], 1)  # 1 (a) + 3 anonymous = full
    cache.release([b"a"], 3, cache.generation)
    cache.clear()
    assert isinstance(cache.take_events()[0], kv.AllBlocksCleared) and cache.match([b"a"]) == 0
    assert cache.free_blocks() == 4


def test_profile_defaults_step_time_and_errors(tmp_path):
    p = SimProfile()
    assert p.step_time([], 0, 0) == 0.0
    t = p.step_time([(0, 1000)], 4096 * 4, 4)
    expected = p.step_overhead_s + p.prefill_token_s * 1000 + p.prefill_attn_s * 1000 * 500 + p.decode_seq_s * 4 + p.decode_kv_token_s * 4096 * 4
    assert t == pytest.approx(expected)
    bad = tmp_path / "p.json"
    bad.write_text('{"block_size": 16, "speed": 2}')
    with pytest.raises(ValueError, match=r"p.json: unknown profile field\(s\) speed"):
        SimProfile.load(bad)
    bad.write_text('{"block_size": -1}')
    with pytest.raises(ValueError, match="field 'block_size' has bad value -1"):
        SimProfile.load(bad)
    with pytest.raises(ValueError, match="does not exist"):
        SimProfile.load(tmp_path / "none.json")
    good = tmp_path / "g.json"
    good.write_text('{"step_overhead_s": 0.001, "max_num_seqs": 8}')
    assert SimProfile.load(good).max_num_seqs == 8


def test_fault_plan_counters_rates_and_errors():
    plan = FaultPlan(fail_next=1, crash_next=1, truncate_next=1, seed=3)
    assert [plan.draw(), plan.draw(), plan.draw(), plan.draw()] == ["fail", "crash", "truncate", None]
    plan.update({"stall_rate": 1.0})
    assert plan.draw() == "stall"
    plan.update({"stall_rate": 0.0, "fail_rate": 0.25, "hang_rate": 0.25})
    draws = [plan.draw() for _ in range(4000)]
    assert 800 < draws.count("fail") < 1200 and 800 < draws.count("hang") < 1200
    assert set(draws) == {"fail", "hang", None}
    assert plan.injected["hang"] == draws.count("hang")
    with pytest.raises(ValueError, match="unknown fault field 'explode'"):
        plan.update({"explode": 1})
    with pytest.raises(ValueError, match="probability"):
        plan.update({"fail_rate": 2})
    with pytest.raises(ValueError, match="add up to more than 1"):
        FaultPlan(fail_rate=0.6, html_rate=0.6)


# -- observations reach the policy's hooks --------------------------------------------------------
@pytest.mark.asyncio
async def test_policy_hooks_get_what_the_proxy_saw():
    import aiohttp

    from proxy.harness import Cluster, call
    from scheduling.policies import POLICIES, LeastLoad

    seen = []

    class Watching(LeastLoad):
        name = "watching"

        def on_first_byte(self, obs):
            seen.append(("first", obs))

        def on_prefill_done(self, obs):
            seen.append(("prefill", obs))

        def on_complete(self, obs):
            seen.append(("complete", obs))

    POLICIES["watching"] = Watching
    try:
        fast = SimProfile(step_overhead_s=0.001)
        async with await Cluster.start("pd", prefill=1, decode=1, profile=fast, policy="watching") as c:
            p, d = c.sims
            async with aiohttp.ClientSession() as s:
                await call(s, c.proxy.url, {"prompt": "x" * 400, "max_tokens": 5, "stream": True,
                                            "stream_options": {"include_usage": True}}, rid="o1")
                await call(s, c.proxy.url, {"prompt": "y" * 400, "max_tokens": 3}, rid="o2")
        kinds = [(k, o.request.request_id, o.instance, o.stage) for k, o in seen]
        assert kinds == [("prefill", "o1", p.url, "prefill"), ("first", "o1", d.url, "decode"),
                         ("complete", "o1", d.url, "decode"), ("prefill", "o2", p.url, "prefill"),
                         ("complete", "o2", d.url, "decode")]
        done = [o for k, o in seen if k == "complete"]
        assert [(o.ok, o.prompt_tokens, o.completion_tokens) for o in done] == [(True, 100, 5), (True, 100, 3)]
        assert all(o.at >= o.sent_at for _, o in seen)
    finally:
        POLICIES.pop("watching")


# -- a stream's headers leave with its first event ----------------------------------------------
@pytest.mark.asyncio
async def test_event_stream_sends_headers_and_first_event_in_one_segment():
    """The client's first read of a proxied stream holds the whole header block and the first
    event (one write; the proxy's server sends a stream's head with its first write)."""
    from proxy.server.front import HttpServer, Routes

    first = b'data: {"choices":[{"text":"a"}]}\n\n'
    prepared, sent = asyncio.Event(), asyncio.Event()

    async def handler(request):
        out = request.stream(200, ())
        prepared.set()
        await asyncio.sleep(0.2)  # the client reads meanwhile: nothing may have gone out yet
        await out.write(first)
        sent.set()
        await asyncio.sleep(0.2)
        await out.write(b"data: [DONE]\n\n")
        await out.end()
        return out

    routes = Routes()
    routes.add("GET", "/s", handler)
    server = HttpServer(routes, keepalive_timeout=5, linger_s=1)
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await prepared.wait()
        with pytest.raises(TimeoutError):  # headers alone are not sent
            await asyncio.wait_for(reader.read(65536), 0.1)
        await sent.wait()
        data = await asyncio.wait_for(reader.read(65536), 1.0)
        head, sep, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and sep
        assert b"transfer-encoding: chunked" in head.lower()
        assert body == f"{len(first):x}\r\n".encode() + first + b"\r\n"  # exactly the first event, chunked
        rest = await asyncio.wait_for(reader.read(65536), 1.0)
        assert rest.startswith(b"e\r\ndata: [DONE]\n\n\r\n")
        writer.close()
    finally:
        await server.close()
