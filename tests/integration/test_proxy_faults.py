"""Each injected fault produces its defined outcome at the client, in the sims and in metrics."""

import asyncio
import json

import aiohttp
import pytest

from proxy.harness import Cluster, call, sse_documents, streamed_text, wait_until as wait_for
from proxy.sim.faults import FaultPlan
from proxy.sim.profile import SimProfile


FAST = SimProfile(step_overhead_s=0.001, decode_seq_s=1e-5)
PROMPT = "The quick brown fox jumps over the lazy dog. " * 8  # 360 chars = 90 tokens

pytestmark = pytest.mark.asyncio


def metric(proxy, line_start: str) -> float:
    for line in proxy.metrics.render().decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_http_500_before_first_byte_is_retried_elsewhere():
    async with await Cluster.start("collocated", collocated=2, profile=FAST, policy="round_robin",
                                   faults={0: FaultPlan(fail_next=1)}) as c:
        a, b = c.sims
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 4}, rid="f-1")
        assert status == 200 and json.loads(text)["choices"][0]["text"] == b.engine.records["f-1"]["output"]
        assert "f-1" not in a.engine.records and a.faults.injected["fail"] == 1
        assert metric(c.proxy, 'omni_proxy_retries_total{stage="collocated"}') == 1
        assert metric(c.proxy, f'omni_proxy_upstream_errors_total{{instance="{a.url}",kind="http_5xx"}}') == 1


async def test_prefill_failure_falls_back_to_decode_only():
    async with await Cluster.start("pd", prefill=1, decode=1, profile=FAST, retries=2,
                                   policy_options={"bypass_tokens": 0}, faults={0: FaultPlan(fail_next=3)}) as c:  # 1 prefill: no other to try
        p, d = c.sims
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 4, "stream": True}, rid="pf")
        assert status == 200
        assert streamed_text(sse_documents(text), False) == d.engine.records["pf"]["output"]
        assert d.engine.records["pf"]["kv_source"] == "local"  # no kv_transfer_params reached decode
        assert p.faults.injected["fail"] == 1 and "pf" not in p.engine.records
        assert metric(c.proxy, 'omni_proxy_pd_fallbacks_total{reason="prefill_failed"}') == 1


async def test_failed_prefill_is_retried_on_another_prefill_first():
    async with await Cluster.start("pd", prefill=2, decode=1, profile=FAST, policy="round_robin",
                                   faults={0: FaultPlan(fail_next=1)}) as c:
        p0, p1, d = c.sims
        async with aiohttp.ClientSession() as s:
            status, _, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 4}, rid="pr")
        assert status == 200 and "pr" in p1.engine.records and d.engine.records["pr"]["kv_source"] == "remote"


async def test_decode_retry_never_reuses_kv_transfer_params():
    # decode 0 pulls the KV, then its connection breaks before the answer (non-streaming crash):
    # the retry on decode 1 must compute the prompt itself, not point at KV already taken
    async with await Cluster.start("pd", prefill=1, decode=2, profile=FAST, policy="round_robin",
                                   faults={1: FaultPlan(crash_next=1, after_tokens=1)}) as c:
        p, d0, d1 = c.sims
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 4}, rid="dr")
        assert status == 200
        assert d0.engine.records["dr"]["status"] == "crashed" and d0.engine.records["dr"]["kv_source"] == "remote"
        assert d1.engine.records["dr"]["kv_source"] == "local"  # not "recomputed": no stale params were sent
        assert json.loads(text)["choices"][0]["text"] == d1.engine.records["dr"]["output"]
        assert metric(c.proxy, 'omni_proxy_pd_fallbacks_total{reason="decode_retry"}') == 1


async def test_crash_mid_stream_ends_the_stream_with_an_error_event():
    async with await Cluster.start("collocated", collocated=1, profile=FAST,
                                   faults={0: FaultPlan(crash_next=1, after_tokens=3)}) as c:
        sim = c.sims[0]
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 20, "stream": True}, rid="cr")
        assert status == 200
        docs = sse_documents(text)
        assert docs[-1] == "[DONE]" and docs[-2]["error"]["type"] == "upstream_error"
        assert "failed mid-stream" in docs[-2]["error"]["message"] and "cr" in docs[-2]["error"]["message"]
        assert sim.url not in text
        received = streamed_text(docs[:-2], False)
        assert len(received.split()) == 3 and sim.engine.records["cr"]["output"].startswith(received)
        assert sim.engine.records["cr"]["status"] == "crashed"
        assert metric(c.proxy, 'omni_proxy_requests_total{endpoint="completions",outcome="stream_error"}') == 1
        assert c.proxy.loads[sim.url].running == 0


async def test_crash_before_a_non_streaming_answer_is_retried():
    async with await Cluster.start("collocated", collocated=2, profile=FAST, policy="round_robin",
                                   faults={0: FaultPlan(crash_next=1)}) as c:
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 4}, rid="cn")
        assert status == 200 and json.loads(text)["choices"][0]["text"] == c.sims[1].engine.records["cn"]["output"]


async def test_stalled_instance_times_out_and_request_moves_on():
    async with await Cluster.start("collocated", collocated=2, profile=FAST, policy="round_robin",
                                   first_byte_timeout=0.4, faults={0: FaultPlan(stall_next=1)}) as c:
        a, b = c.sims
        async with aiohttp.ClientSession() as s:
            t0 = asyncio.get_running_loop().time()
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 4, "stream": True}, rid="st")
            elapsed = asyncio.get_running_loop().time() - t0
        assert status == 200, text
        assert streamed_text(sse_documents(text), False) == b.engine.records["st"]["output"]
        assert 0.4 <= elapsed < 2.0
        assert metric(c.proxy, f'omni_proxy_upstream_errors_total{{instance="{a.url}",kind="timeout"}}') == 1
        assert c.proxy.loads[a.url].running == 0


async def test_slow_instance_keeps_serving_and_gets_less_traffic():
    async with await Cluster.start("collocated", collocated=2, profile=SimProfile(step_overhead_s=0.005),
                                   faults={0: FaultPlan(slowdown=10.0)}) as c:
        slow, fast = c.sims
        async with aiohttp.ClientSession() as s:
            tasks = []
            for k in range(30):
                tasks.append(asyncio.ensure_future(
                    call(s, c.proxy.url, {"prompt": f"request {k} " + PROMPT, "max_tokens": 8}, rid=f"sl-{k}")))
                await asyncio.sleep(0.02)
            results = await asyncio.gather(*tasks)
        assert all(r[0] == 200 for r in results)
        served_slow = sum(f"sl-{k}" in slow.engine.records for k in range(30))
        assert served_slow + sum(f"sl-{k}" in fast.engine.records for k in range(30)) == 30
        assert served_slow < 10  # load follows speed
        assert slow.engine.busy_s > 0


async def test_refused_connections_take_the_instance_out_until_it_answers_again():
    async with await Cluster.start("collocated", collocated=2, profile=FAST, policy="round_robin",
                                   health_interval=0.1, health_timeout=0.1, breaker_failures=2,
                                   breaker_cooldown=0.3) as c:
        a, b = c.sims
        await a.refuse_for(1.0)
        inst = c.proxy.registry.instances[a.url]
        async with aiohttp.ClientSession() as s:
            statuses = [(await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 2}, rid=f"rf-{k}"))[0]
                        for k in range(6)]
            assert statuses == [200] * 6
            assert not any(f"rf-{k}" in a.engine.records for k in range(6))
            await wait_for(lambda: inst.down, timeout=2)  # probes too: 3 misses
            assert metric(c.proxy, f'omni_proxy_instance_usable{{instance="{a.url}",role="collocated"}}') == 0
            # back: probes lift "down", the cooldown is over, a trial request closes the circuit
            await wait_for(lambda: inst.usable(c.proxy.now()), timeout=5)
            for k in range(6, 10):
                assert (await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 2}, rid=f"rf-{k}"))[0] == 200
            assert any(f"rf-{k}" in a.engine.records for k in range(6, 10))
            assert inst.breaker.state == "closed"


async def test_client_disconnect_cancels_upstream_and_frees_load():
    async with await Cluster.start("pd", prefill=1, decode=1, profile=SimProfile(step_overhead_s=0.02),
                                   policy_options={"bypass_tokens": 0}) as c:
        p, d = c.sims
        async with aiohttp.ClientSession() as s:
            resp = await s.post(c.proxy.url + "/v1/completions", headers={"X-Request-Id": "gone"},
                                json={"prompt": PROMPT, "max_tokens": 500, "stream": True})
            assert resp.status == 200
            await resp.content.readany()
            resp.close()  # the client goes away mid-stream
        await wait_for(lambda: "gone" in d.engine.records)
        assert d.engine.records["gone"]["status"] == "aborted" and d.engine.records["gone"]["completion_tokens"] < 500
        assert len(d.engine.running) == 0 and d.engine.cache.anonymous == 0
        await wait_for(lambda: all(l.running == 0 and l.kv_tokens == 0 and l.prefill_tokens == 0
                                   for l in c.proxy.loads.instances.values()))
        await wait_for(lambda: metric(c.proxy, 'omni_proxy_requests_total{endpoint="completions",outcome="client_gone"}') == 1)


async def test_client_disconnect_while_waiting_for_prefill():
    async with await Cluster.start("pd", prefill=1, decode=1, profile=SimProfile(prefill_token_s=0.005),
                                   policy_options={"bypass_tokens": 0}) as c:  # ~0.5 s of prefill
        p = c.sims[0]
        async with aiohttp.ClientSession() as s:
            task = asyncio.ensure_future(s.post(c.proxy.url + "/v1/completions", headers={"X-Request-Id": "early"},
                                                json={"prompt": PROMPT, "max_tokens": 5}))
            await wait_for(lambda: len(p.engine.running) == 1)
            task.cancel()
        await wait_for(lambda: "early" in p.engine.records)
        assert p.engine.records["early"]["status"] == "aborted"
        await wait_for(lambda: c.proxy.loads[p.url].running == 0 and c.proxy.loads[p.url].prefill_tokens == 0)


async def test_bad_requests_get_4xx_naming_the_problem():
    async with await Cluster.start("collocated", collocated=1, profile=SimProfile(max_model_len=200),
                                   max_body_bytes=2000) as c:
        base = c.proxy.url
        async with aiohttp.ClientSession() as s:
            async with s.post(base + "/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
            async with s.post(base + "/v1/completions", data=b"x" * 5000) as r:
                err = (await r.json())["error"]
                assert r.status == 413 and "5000 bytes, over the limit of 2000 bytes (--max-body-bytes)" in err["message"]
            async with s.post(base + "/v1/chat/completions", json={"prompt": "x"}) as r:
                err = (await r.json())["error"]
                assert r.status == 400 and err["param"] == "messages" and "'messages' is required" in err["message"]
            async with s.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": -3}) as r:
                assert r.status == 400 and "'max_tokens' must be a positive integer, got -3" in (await r.json())["error"]["message"]
            # the instance's own 4xx is passed through, not retried
            async with s.post(base + "/v1/completions", json={"prompt": "y" * 1200, "max_tokens": 10}) as r:
                assert r.status == 400 and "maximum context length is 200 tokens" in (await r.json())["error"]["message"]
        assert metric(c.proxy, 'omni_proxy_retries_total{stage="collocated"}') == 0
        assert metric(c.proxy, 'omni_proxy_requests_total{endpoint="completions",outcome="upstream_4xx"}') == 1


async def test_no_usable_instance_gives_503_or_502_without_internal_urls(caplog):
    async with await Cluster.start("pd", prefill=1, decode=1, profile=FAST, health_interval=0.1,
                                   breaker_failures=1, breaker_cooldown=30, retries=1) as c:
        p, d = c.sims
        await d.refuse_for(30)
        async with aiohttp.ClientSession() as s:
            status, text, headers = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 2}, rid="nu-1")
            err = json.loads(text)["error"]
            assert status == 502 and err["type"] == "upstream_error" and "nu-1" in err["message"]
            assert headers["X-Request-Id"] == "nu-1" and "127.0.0.1" not in text
            await wait_for(lambda: c.proxy.registry.instances[d.url].down)  # probes: it is gone, not only failing
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 2}, rid="nu-2")
            err = json.loads(text)["error"]
            assert status == 503 and err["message"].startswith("no usable decode instance: 1 registered, 1 down")
            assert "127.0.0.1" not in text and "nu-2" in err["message"]
            async with s.get(c.proxy.url + "/health") as r:
                assert r.status == 503 and "127.0.0.1" not in await r.text()
        # the log has what the client was not told: which instance, and why
        assert any("nu-2" in r.getMessage() and d.url in r.getMessage() for r in caplog.records)


async def test_held_request_times_out_with_503():
    async with await Cluster.start("collocated", collocated=1, profile=SimProfile(step_overhead_s=0.05),
                                   policy_options={"decode_max_running": 1}, queue_timeout=0.2) as c:
        async with aiohttp.ClientSession() as s:
            first = asyncio.ensure_future(call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 20}))
            await asyncio.sleep(0.05)
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 2})
            assert status == 503 and "every candidate instance stayed at its limits" in json.loads(text)["error"]["message"]
            assert (await first)[0] == 200


async def test_admin_endpoints_need_the_token_and_change_the_pool():
    async with await Cluster.start("collocated", collocated=1, profile=FAST, admin_token="s3cret") as c:
        extra = await Cluster.start("collocated", collocated=1, profile=FAST, proxy=False)
        try:
            new = extra.sims[0]
            base = c.proxy.url + "/admin/instances"
            good = {"Authorization": "Bearer s3cret"}
            async with aiohttp.ClientSession() as s:
                async with s.get(base) as r:
                    assert r.status == 401
                async with s.post(base, json={"url": new.url}, headers={"Authorization": "Bearer nope"}) as r:
                    assert r.status == 401
                async with s.post(base, json={"url": new.url, "role": "decode"}, headers=good) as r:
                    assert r.status == 400 and "collocated" in (await r.json())["error"]["message"]
                async with s.post(base, json={"url": new.url, "kv_events": new.kv_endpoint}, headers=good) as r:
                    assert r.status == 201 and (await r.json())["url"] == new.url
                async with s.post(base, json={"url": new.url}, headers=good) as r:
                    assert r.status == 400 and "already registered" in (await r.json())["error"]["message"]
                async with s.get(base, headers=good) as r:
                    assert [i["url"] for i in (await r.json())["instances"]] == [c.sims[0].url, new.url]
                for k in range(4):
                    await call(s, c.proxy.url, {"prompt": f"{k} " + PROMPT, "max_tokens": 2}, rid=f"ad-{k}")
                assert any(f"ad-{k}" in new.engine.records for k in range(4))
                async with s.delete(base, json={"url": new.url}, headers=good) as r:
                    assert r.status == 200
                async with s.delete(base, json={"url": new.url}, headers=good) as r:
                    assert r.status == 404 and "no instance" in (await r.json())["error"]["message"]
                for k in range(4, 8):
                    await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 2}, rid=f"ad-{k}")
                assert not any(f"ad-{k}" in new.engine.records for k in range(4, 8))
        finally:
            await extra.stop()


async def test_admin_endpoints_are_off_without_a_token():
    async with await Cluster.start("collocated", collocated=1, profile=FAST) as c:
        async with aiohttp.ClientSession() as s:
            async with s.get(c.proxy.url + "/admin/instances", headers={"Authorization": "Bearer x"}) as r:
                assert r.status == 403 and "--admin-token" in (await r.json())["error"]["message"]


# -- the upstream lies, leaks, hangs or cuts --------------------------------------------------------
def strict_events(text: str) -> list:
    """Every event of an SSE body, each of which must be one complete ``data:`` line of JSON or [DONE]."""
    assert text.endswith("\n\n"), text[-200:]
    out = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block[:200]
        payload = block[6:]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@pytest.mark.parametrize("chat", [False, True])
async def test_stream_cut_mid_event_drops_the_partial_event_then_error_and_done(chat):
    async with await Cluster.start("collocated", collocated=1, profile=FAST,
                                   faults={0: FaultPlan(truncate_next=1, after_tokens=3)}) as c:
        sim = c.sims[0]
        body = {"max_tokens": 20, "stream": True}
        body.update({"messages": [{"role": "user", "content": PROMPT}]} if chat else {"prompt": PROMPT})
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, body, rid="cut", chat=chat)
        assert status == 200
        docs = strict_events(text)  # the half event the sim wrote never reached the client
        assert docs[-1] == "[DONE]" and docs[-2]["error"]["type"] == "upstream_error"
        assert "cut" in docs[-2]["error"]["message"] and sim.url not in text
        received = streamed_text(docs[:-2], chat)
        assert len(received.split()) == 3 and sim.engine.records["cut"]["output"].startswith(received)
        assert metric(c.proxy, f'omni_proxy_upstream_errors_total{{instance="{sim.url}",kind="stream_broken"}}') == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_200_that_is_not_json_or_not_sse_is_a_502_or_a_retry(stream):
    async with await Cluster.start("collocated", collocated=1, profile=FAST, retries=2,
                                   faults={0: FaultPlan(garbage_next=3)}) as c:  # every attempt of one request
        async with aiohttp.ClientSession() as s:
            status, text, headers = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 3, "stream": stream},
                                               rid="junk")
        err = json.loads(text)["error"]
        assert status == 502 and headers["Content-Type"].startswith("application/json")
        assert err["type"] == "upstream_error" and "junk" in err["message"] and "overflow" not in text
        assert metric(c.proxy, f'omni_proxy_upstream_errors_total{{instance="{c.sims[0].url}",kind="bad_response"}}') == 3
        # the only instance is retried: it serves the next attempt
        c.sims[0].faults.garbage_next = 1
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 3, "stream": stream},
                                         rid="junk1")
        assert status == 200 and c.sims[0].faults.injected["garbage"] == 4
    async with await Cluster.start("collocated", collocated=2, profile=FAST, policy="round_robin",
                                   faults={0: FaultPlan(garbage_next=1)}) as c:
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 3, "stream": stream},
                                         rid="junk2")
        assert status == 200
        out = streamed_text(strict_events(text), False) if stream else json.loads(text)["choices"][0]["text"]
        assert out == c.sims[1].engine.records["junk2"]["output"]


async def test_500_html_with_internal_urls_is_logged_never_returned(caplog):
    async with await Cluster.start("collocated", collocated=1, profile=FAST, retries=0,
                                   faults={0: FaultPlan(html_next=1)}) as c:
        async with aiohttp.ClientSession() as s:
            status, text, headers = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 3}, rid="leak-1")
        assert status == 502 and headers["X-Request-Id"] == "leak-1"
        doc = json.loads(text)
        assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
        assert doc["error"]["code"] == 502 and "leak-1" in doc["error"]["message"]
        for secret in ("<html", "10.0.3.7", "grafana", "svc.cluster.local", c.sims[0].url, "127.0.0.1"):
            assert secret not in text
        logged = [r.getMessage() for r in caplog.records if "leak-1" in r.getMessage()]
        assert any("10.0.3.7" in m and "500" in m for m in logged)  # the body, with the request id


async def test_hung_stream_after_first_tokens_ends_within_the_idle_timeout():
    async with await Cluster.start("collocated", collocated=1, profile=FAST, idle_timeout=0.5,
                                   faults={0: FaultPlan(hang_next=1, after_tokens=2)}) as c:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as s:
            t0 = loop.time()
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 20, "stream": True}, rid="hg")
            elapsed = loop.time() - t0
        docs = strict_events(text)
        assert status == 200 and docs[-1] == "[DONE]" and "error" in docs[-2]
        assert len(streamed_text(docs[:-2], False).split()) == 2
        assert 0.5 <= elapsed < 2.0
        assert c.proxy.loads[c.sims[0].url].running == 0 and c.proxy.inflight.count(c.sims[0].url) == 0


async def test_hung_whole_answer_is_retried_after_the_request_timeout():
    async with await Cluster.start("collocated", collocated=2, profile=FAST, policy="round_robin",
                                   request_timeout=0.5, faults={0: FaultPlan(hang_next=1)}) as c:
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 3}, rid="hw")
        assert status == 200 and json.loads(text)["choices"][0]["text"] == c.sims[1].engine.records["hw"]["output"]
        assert metric(c.proxy, f'omni_proxy_upstream_errors_total{{instance="{c.sims[0].url}",kind="timeout"}}') == 1


async def test_instance_failing_requests_while_passing_health_stays_out_without_flapping():
    cooldown = 0.2
    async with await Cluster.start("collocated", collocated=2, profile=FAST, policy="round_robin",
                                   health_interval=0.05, health_timeout=0.5, breaker_failures=3,
                                   breaker_cooldown=cooldown, faults={0: FaultPlan(fail_rate=1.0)}) as c:
        bad, good = c.sims
        inst = c.proxy.registry.instances[bad.url]
        seen: list[str] = []

        async def watch():
            while True:
                seen.append(inst.breaker.state)
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with aiohttp.ClientSession() as s:
            k = 0
            while loop.time() - t0 < 2.5:
                status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 1}, rid=f"fl-{k}")
                assert status == 200, text  # every request answered (the good instance, after a retry)
                k += 1
        watcher.cancel()
        elapsed = loop.time() - t0
        assert k > 40 and inst.last_health_ok  # probes kept passing all along
        # after the circuit first opened it never closed: only half-open trials reached the instance
        first_open = seen.index("open")
        assert "closed" not in seen[first_open:]
        # 3 failures open it; then one trial per cooldown, doubling: 0.2, 0.4, 0.8, 1.6 s ...
        trials, t, cd = 0, 0.0, cooldown
        while t + cd <= elapsed:
            t, cd, trials = t + cd, cd * 2, trials + 1
        assert bad.faults.injected["fail"] <= 3 + trials + 1
        assert inst.breaker.trips == bad.faults.injected["fail"] - 2  # the first opening, then each failed trial


async def test_n_and_best_of_pass_through_in_collocated_mode():
    async with await Cluster.start("collocated", collocated=1, profile=FAST) as c:
        sim = c.sims[0]
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 4, "n": 3, "best_of": 3},
                                         rid="n3")
            assert status == 200
            doc = json.loads(text)
            assert [ch["index"] for ch in doc["choices"]] == [0, 1, 2]
            assert [ch["text"] for ch in doc["choices"]] == [sim.engine.records[f"n3-{k}"]["output"] for k in range(3)]
            assert len({ch["text"] for ch in doc["choices"]}) == 3 and doc["usage"]["completion_tokens"] == 12
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 4, "n": 2, "stream": True},
                                         rid="n2s")
            docs = strict_events(text)
            for k in range(2):
                got = "".join(d["choices"][0]["text"] for d in docs[:-1] if d["choices"][0]["index"] == k)
                assert got == sim.engine.records[f"n2s-{k}"]["output"]


async def test_n_above_one_is_refused_in_pd_mode_not_reduced():
    async with await Cluster.start("pd", prefill=1, decode=1, profile=FAST) as c:
        async with aiohttp.ClientSession() as s:
            for extra in ({"n": 3}, {"best_of": 3}, {"n": 2, "best_of": 3}, {"use_beam_search": True}):
                status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 4, **extra}, rid="pdn")
                err = json.loads(text)["error"]
                assert status == 400 and "pd mode" in err["message"], text
            assert not c.sims[0].engine.records and not c.sims[1].engine.records  # nothing reached an instance
            status, _, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 4, "n": 1}, rid="pd1")
            assert status == 200
