"""Proxy + simulated instances over real sockets: PD and collocated, streaming and not."""

import asyncio
import json

import aiohttp
import pytest

from proxy.harness import Cluster, call, sse_documents, streamed_text, wait_until as wait_for
from proxy.sim.profile import SimProfile
from proxy.wire.text import char_block_ids, render_chat
from scheduling.prefix_index import CONFIRMED

pytestmark = pytest.mark.asyncio

FAST = SimProfile(step_overhead_s=0.001, decode_seq_s=1e-5)


PROMPT = "The quick brown fox jumps over the lazy dog. " * 8  # 360 chars = 90 tokens


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
async def test_collocated_client_gets_exactly_the_instance_tokens(stream, chat):
    async with await Cluster.start("collocated", collocated=2, profile=FAST, policy="round_robin") as c:
        body = {"model": "sim-model", "max_tokens": 7, "stream": stream}
        body.update({"messages": [{"role": "user", "content": PROMPT}]} if chat else {"prompt": PROMPT})
        if stream:
            body["stream_options"] = {"include_usage": True}
        async with aiohttp.ClientSession() as s:
            status, text, headers = await call(s, c.proxy.url, body, rid="req-1", chat=chat)
        assert status == 200 and headers["X-Request-Id"] == "req-1"
        served = [sim for sim in c.sims if "req-1" in sim.engine.records]
        assert len(served) == 1
        record = served[0].engine.records["req-1"]
        prompt_tokens = len(char_block_ids(render_chat(body["messages"]) if chat else PROMPT))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 7, "total_tokens": prompt_tokens + 7}
        if stream:
            docs = sse_documents(text)
            assert docs[-1] == "[DONE]"
            assert streamed_text(docs, chat) == record["output"]
            assert docs[-2]["usage"] == usage
        else:
            doc = json.loads(text)
            got = doc["choices"][0]["message"]["content"] if chat else doc["choices"][0]["text"]
            assert got == record["output"] and len(got.split()) == 7
            assert doc["usage"] == usage


@pytest.mark.parametrize("stream", [False, True])
async def test_pd_prefill_then_decode_with_kv_transfer_params(stream):
    async with await Cluster.start("pd", prefill=2, decode=2, profile=FAST,
                                   policy_options={"bypass_tokens": 0}) as c:
        body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 9, "stream": stream}
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, body, rid="pd-1")
        assert status == 200
        prefills = [p for p in c.by_role("prefill") if "pd-1" in p.engine.records]
        decodes = [d for d in c.by_role("decode") if "pd-1" in d.engine.records]
        assert len(prefills) == 1 and len(decodes) == 1  # same request id on both
        p_rec, d_rec = prefills[0].engine.records["pd-1"], decodes[0].engine.records["pd-1"]
        assert p_rec["remote_decode"] and p_rec["completion_tokens"] == 1  # max_tokens=1 at prefill
        assert d_rec["kv_source"] == "remote"  # decode pulled the KV the prefill returned
        assert prefills[0].engine.counters["kv_pulled"] == 1
        out = streamed_text(sse_documents(text), False) if stream else json.loads(text)["choices"][0]["text"]
        assert out == d_rec["output"] and d_rec["completion_tokens"] == 9
        if not stream:
            assert json.loads(text)["usage"] == {"prompt_tokens": 90, "completion_tokens": 9, "total_tokens": 99}


async def test_pd_bypass_sends_short_prompts_straight_to_decode():
    async with await Cluster.start("pd", prefill=1, decode=1, profile=FAST, policy_options={"bypass_tokens": 128}) as c:
        async with aiohttp.ClientSession() as s:
            status, _, _ = await call(s, c.proxy.url, {"prompt": "short prompt", "max_tokens": 3}, rid="b-1")
            status2, _, _ = await call(s, c.proxy.url, {"prompt": "x" * 1000, "max_tokens": 3}, rid="b-2")
        assert status == status2 == 200
        p, d = c.by_role("prefill")[0], c.by_role("decode")[0]
        assert "b-1" not in p.engine.records and d.engine.records["b-1"]["kv_source"] == "local"
        assert "b-2" in p.engine.records and d.engine.records["b-2"]["kv_source"] == "remote"


async def test_models_health_metrics():
    async with await Cluster.start("collocated", collocated=1, profile=FAST) as c:
        async with aiohttp.ClientSession() as s:
            await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 2})
            async with s.get(c.proxy.url + "/v1/models") as r:
                assert r.status == 200 and (await r.json())["data"][0]["id"] == "sim-model"
            async with s.get(c.proxy.url + "/health") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"
            async with s.get(c.proxy.url + "/metrics") as r:
                text = await r.text()
        url = c.sims[0].url
        assert f'omni_proxy_routing_decisions_total{{instance="{url}",reason="load",stage="collocated"}} 1.0' in text
        assert 'omni_proxy_requests_total{endpoint="completions",outcome="ok"} 1.0' in text
        assert f'omni_proxy_instance_running{{instance="{url}",role="collocated"}} 0.0' in text
        assert "omni_proxy_ttft_seconds_count 1.0" in text


async def test_kv_events_move_the_prefix_index():
    profile = SimProfile(step_overhead_s=0.001, num_kv_blocks=40)  # small cache: evictions happen
    async with await Cluster.start("collocated", collocated=1, profile=profile, approx_ttl=0.3) as c:
        sim, proxy = c.sims[0], c.proxy
        url = sim.url
        keys = proxy.hasher.keys(char_block_ids(PROMPT))  # 90 tokens -> 5 full blocks
        await asyncio.sleep(0.3)  # let the SUB socket connect before events flow
        async with aiohttp.ClientSession() as s:
            assert (await call(s, proxy.url, {"prompt": PROMPT, "max_tokens": 2}))[0] == 200
            # BlockStored confirms the routing-time guesses: they no longer expire
            await wait_for(lambda: all(proxy.index._entries[url].get(k) == CONFIRMED for k in keys))
            await asyncio.sleep(0.4)
            proxy.index.expire(proxy.now())
            assert proxy.index.match(keys) == {url: 5}
            # a long prompt needs the room: the sim evicts, BlockRemoved reaches the index, which
            # then mirrors the sim's cache block for block
            other = "Completely different text with no shared prefix at all! " * 42  # 2352 chars = 588 tokens
            assert (await call(s, proxy.url, {"prompt": other, "max_tokens": 2}))[0] == 200
            await wait_for(lambda: proxy.index.match(keys)[url] < 5)
            digests = sim.engine.digests_of(char_block_ids(PROMPT))
            cached = [d in sim.engine.cache.free_cached or d in sim.engine.cache.refs for d in digests]
            assert not all(cached) and cached == sorted(cached, reverse=True)  # the tail went first
            assert [proxy.index.contains(url, k) for k in keys] == cached
            # AllBlocksCleared empties the instance's entries
            async with s.post(url + "/reset_prefix_cache") as r:
                assert r.status == 200
            await wait_for(lambda: proxy.index.size(url) == 0)
        text = proxy.metrics.render().decode()
        assert f'omni_proxy_kv_events_total{{instance="{url}",type="BlockStored"}}' in text
        assert f'omni_proxy_kv_events_total{{instance="{url}",type="BlockRemoved"}}' in text
        assert f'omni_proxy_kv_events_total{{instance="{url}",type="AllBlocksCleared"}} 1.0' in text


@pytest.mark.parametrize("policy", ["omni", "cache_aware"])
async def test_prefix_aware_policies_follow_the_cache(policy):
    async with await Cluster.start("collocated", collocated=3, profile=FAST, policy=policy) as c:
        await asyncio.sleep(0.3)
        system = "You are a helpful assistant with a long system prompt. " * 12
        async with aiohttp.ClientSession() as s:
            await call(s, c.proxy.url, {"prompt": system + "first question", "max_tokens": 2}, rid="p-0")
            first = next(sim for sim in c.sims if "p-0" in sim.engine.records)
            for k in range(1, 6):
                await call(s, c.proxy.url, {"prompt": system + f"question number {k}", "max_tokens": 2}, rid=f"p-{k}")
        for k in range(1, 6):
            assert f"p-{k}" in first.engine.records
            assert first.engine.records[f"p-{k}"]["cached_tokens"] >= 160


async def test_round_robin_spreads_in_order():
    async with await Cluster.start("collocated", collocated=3, profile=FAST, policy="round_robin") as c:
        async with aiohttp.ClientSession() as s:
            for k in range(6):
                await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 1}, rid=f"rr-{k}")
        assert [[f"rr-{k}" in sim.engine.records for k in range(6)] for sim in c.sims] == [
            [True, False, False, True, False, False], [False, True, False, False, True, False],
            [False, False, True, False, False, True]]


async def test_omni_holds_requests_beyond_limits_and_serves_them_in_order():
    async with await Cluster.start("collocated", collocated=1, profile=SimProfile(step_overhead_s=0.05),
                                   policy_options={"decode_max_running": 1}, queue_timeout=30) as c:
        sim = c.sims[0]
        peak = {"running": 0}

        async def watch():
            while True:
                peak["running"] = max(peak["running"], len(sim.engine.running) + len(sim.engine.waiting))
                await asyncio.sleep(0.002)

        watcher = asyncio.ensure_future(watch())
        async with aiohttp.ClientSession() as s:
            first = asyncio.ensure_future(call(s, c.proxy.url, {"prompt": "a" * 400, "max_tokens": 5}, rid="h-0"))
            await wait_for(lambda: c.proxy.loads[sim.url].running == 1)  # h-0 placed first
            rest = [asyncio.ensure_future(call(s, c.proxy.url, {"prompt": "b" * n, "max_tokens": 5}, rid=f"h-{n}"))
                    for n in (4000, 40, 400)]
            await wait_for(lambda: len(c.proxy.queues["collocated"]) == 3)  # h-0 runs ~0.25 s
            assert "h-0" not in sim.engine.records
            results = await asyncio.gather(first, *rest)
        watcher.cancel()
        assert all(r[0] == 200 for r in results)
        assert peak["running"] == 1  # the limit held: one request at a time reached the instance
        finished = sorted(sim.engine.records.values(), key=lambda r: list(sim.engine.records).index(r["request_id"]))
        assert [r["request_id"] for r in finished] == ["h-0", "h-40", "h-400", "h-4000"]  # short first


async def test_pd_kv_pull_over_http_between_processes(monkeypatch):
    # sims in separate processes find each other only through kv_transfer_params' host and port
    import proxy.sim.server as sim_server

    async with await Cluster.start("pd", prefill=1, decode=1, profile=FAST, policy_options={"bypass_tokens": 0}) as c:
        monkeypatch.setattr(sim_server, "_LOCAL", {})
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 3}, rid="http-pull")
        p, d = c.sims
        assert status == 200 and d.engine.records["http-pull"]["kv_source"] == "remote"
        assert p.engine.counters["kv_pulled"] == 1 and not p.engine.held
