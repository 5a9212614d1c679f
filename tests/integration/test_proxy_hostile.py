"""Hostile clients: forged KV parameters, deep JSON, bad message content, slowloris, huge prompts."""

import asyncio
import json
import time

import aiohttp
import pytest

from proxy.harness import Cluster, call
from proxy.server.prepare import PREFILL_KV_PARAMS
from proxy.sim.profile import SimProfile

pytestmark = pytest.mark.asyncio

FAST = SimProfile(step_overhead_s=0.001, decode_seq_s=1e-5)
PROMPT = "The quick brown fox jumps over the lazy dog. " * 8


class Canary:
    """A TCP port that records whether anybody connected (where a forged KV pull would go)."""

    async def __aenter__(self):
        self.connections = 0

        async def seen(reader, writer):
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(seen, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()


def forged(canary_port):
    return {"do_remote_prefill": True, "do_remote_decode": True, "remote_engine_id": "attacker",
            "remote_host": "127.0.0.1", "remote_port": canary_port, "remote_request_id": "x", "remote_block_ids": [1]}


# -- no client field steers an engine ------------------------------------------------------------
@pytest.mark.parametrize("where", ["top", "vllm_xargs"])
@pytest.mark.parametrize("stream", [False, True])
async def test_collocated_drops_client_kv_transfer_params(where, stream):
    async with Canary() as canary, await Cluster.start("collocated", collocated=1, profile=FAST) as c:
        sim = c.sims[0]
        body = {"prompt": PROMPT, "max_tokens": 3, "stream": stream}
        if where == "top":
            body.update(kv_transfer_params=forged(canary.port), ec_transfer_params={"remote_host": "127.0.0.1"})
        else:
            body["vllm_xargs"] = {"kv_transfer_params": json.dumps(forged(canary.port)), "keep": 1}
        async with aiohttp.ClientSession() as s:
            status, _, _ = await call(s, c.proxy.url, body, rid="forged")
        assert status == 200
        record = sim.engine.records["forged"]
        assert record["kv_transfer_params_in"] is None and record["kv_source"] == "local"
        assert not record["remote_decode"] and not sim.engine.held  # no KV pinned for a transfer
        assert canary.connections == 0
        field = "kv_transfer_params" if where == "top" else "vllm_xargs.kv_transfer_params"
        assert c.proxy.metrics.dropped_fields.labels(field)._value.get() == 1


async def test_forged_remote_decode_requests_cannot_pin_the_kv_cache():
    # 17 forged requests of ~940 blocks each would hold 16,000 of 16,384 blocks for 60 s
    profile = SimProfile(step_overhead_s=0.001, prefill_token_s=1e-8, prefill_attn_s=0.0, decode_seq_s=1e-5)
    async with await Cluster.start("collocated", collocated=1, profile=profile) as c:
        sim = c.sims[0]
        big = "z" * (940 * 16 * 4 - 64)
        async with aiohttp.ClientSession() as s:
            results = await asyncio.gather(*(
                call(s, c.proxy.url, {"prompt": f"{k:04d}" + big, "max_tokens": 1,
                                      "kv_transfer_params": {"do_remote_decode": True}}, rid=f"pin-{k}")
                for k in range(17)))
            assert all(status == 200 for status, _, _ in results)
            assert not sim.engine.held  # nothing kept for a remote decode
            t0 = time.monotonic()
            status, _, _ = await call(s, c.proxy.url, {"prompt": "y" + big, "max_tokens": 4}, rid="normal")
            assert status == 200 and time.monotonic() - t0 < 2.0


async def test_pd_replaces_client_kv_transfer_params_with_its_own():
    async with Canary() as canary, await Cluster.start("pd", prefill=1, decode=1, profile=FAST,
                                                       policy_options={"bypass_tokens": 0}) as c:
        p, d = c.sims
        body = {"prompt": PROMPT, "max_tokens": 3, "kv_transfer_params": forged(canary.port),
                "vllm_xargs": {"kv_transfer_params": "x"}}
        async with aiohttp.ClientSession() as s:
            status, _, _ = await call(s, c.proxy.url, body, rid="pd-forged")
        assert status == 200
        assert p.engine.records["pd-forged"]["kv_transfer_params_in"] == PREFILL_KV_PARAMS
        got = d.engine.records["pd-forged"]["kv_transfer_params_in"]
        assert got["remote_engine_id"] == p.engine_id and got["remote_port"] == p.port
        assert d.engine.records["pd-forged"]["kv_source"] == "remote" and canary.connections == 0


# -- bad input gets a 400 that names the problem --------------------------------------------------
async def test_deep_json_and_bad_message_content_are_400s():
    async with await Cluster.start("collocated", collocated=1, profile=FAST) as c:
        sim = c.sims[0]
        deep = b'{"prompt": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        async with aiohttp.ClientSession() as s:
            async with s.post(c.proxy.url + "/v1/completions", data=deep) as r:
                assert r.status == 400 and "more than 400 levels deep" in (await r.json())["error"]["message"]
            nested = {"prompt": "x", "max_tokens": 1}
            inner = nested
            for _ in range(398):  # 399 levels with the body itself: accepted
                inner["x"] = {}
                inner = inner["x"]
            status, _, _ = await call(s, c.proxy.url, nested)
            assert status == 200
            inner["x"] = {"y": {}}  # 401
            status, text, _ = await call(s, c.proxy.url, nested)
            assert status == 400 and "levels deep" in text
            for messages, where in (
                ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
                ([{"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]}],
                 "messages[0].content[0].image_url.url"),
                ([{"role": "user", "content": [{"type": "hologram", "data": 1}]}], "messages[0].content[0]"),
                ([{"role": "user", "content": 42}], "messages[0].content"),
                ([{"role": "robot", "content": "hi"}], "messages[0].role"),
                ([{"role": "tool", "content": "42"}], "messages[0].tool_call_id"),
                ([{"role": "user"}], "messages[0].content"),
            ):
                status, text, _ = await call(s, c.proxy.url, {"messages": messages}, chat=True)
                err = json.loads(text)["error"]
                assert status == 400 and err["param"] == where, (messages, err)
            ok = [{"role": "system", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hi"},
                                               {"type": "image_url", "image_url": {"url": "data:x"}}]},
                  {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                                        "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "1", "content": "42"}]
            status, text, _ = await call(s, c.proxy.url, {"messages": ok, "max_tokens": 2}, chat=True)
            assert status == 200, text
        assert c.proxy.metrics.requests.labels("chat", "client_error")._value.get() == 7
        assert len(sim.engine.records) == 2  # the refused ones never reached the instance


# -- slowloris ----------------------------------------------------------------------------------
async def closed_after(reader) -> float:
    t0 = time.monotonic()
    while await reader.read(65536):
        pass
    return time.monotonic() - t0


async def test_slowloris_idle_partial_head_partial_body_and_idle_keepalive_are_cut():
    async with await Cluster.start("collocated", collocated=1, profile=FAST, keepalive_timeout=0.5,
                                   body_timeout=0.5) as c:
        host, port = "127.0.0.1", c.proxy.config.port
        # a connection that never sends anything
        reader, writer = await asyncio.open_connection(host, port)
        assert await asyncio.wait_for(closed_after(reader), 5) < 1.5
        # a request head dripped a byte every 0.1 s, never finished
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")

        async def drip():
            for _ in range(50):
                writer.write(b"X")
                await asyncio.sleep(0.1)

        dripper = asyncio.ensure_future(drip())
        assert await asyncio.wait_for(closed_after(reader), 5) < 1.5
        dripper.cancel()
        # a body that stops halfway: 408, then the connection closes
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "' + b"a" * 20)
        t0 = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 5)
        # 0.5 s body timeout, then at most 1 s draining what is left before closing
        assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer and time.monotonic() - t0 < 2.5
        # an idle keep-alive connection after a full request
        reader, writer = await asyncio.open_connection(host, port)
        body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(closed_after(reader), 5) < 1.5


# -- a huge prompt does not stall everyone else ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_15_mb_prompt_is_prepared_off_the_loop():
    from proxy.stress.large_prompt import run

    # the goal is 50 ms (figures in docs/proxy.md); a 2-core CI machine gets a looser bound, scaled
    # by how slow small requests are there anyway, that still fails a proxy that tokenizes on its
    # event loop (1.3-3.5 s here); a second try absorbs a stall of the whole machine
    for attempt in range(2):
        result = await asyncio.get_running_loop().run_in_executor(None, lambda: run(15, 50, 1.0, ("offload",)))
        v = result["variants"]["offload"]
        assert v["large"]["offloaded"] and v["large"]["status"] == 400  # over the sims' context length, as vLLM says
        assert "maximum context length" in v["large"]["answer"] and v["small_failures"] == 0
        bound = max(500.0, 4 * v["quiet"]["p99_ms"])
        if v["during"]["n"] > 20 and v["during"]["p99_ms"] < bound:
            return
    raise AssertionError(f"small requests stalled while a 15 MB prompt was prepared: {v}")
