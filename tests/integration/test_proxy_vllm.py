"""The proxy in front of two real vllm-cpu instances serving a tiny random DeepSeek-V3: collocated
with vLLM's KV events feeding the prefix index, and PD with KV moved by vLLM's ExampleConnector.

On CPUs without AMX, vLLM 0.32 turns prefix caching (and with it KV events) off for MLA models
("MLA is enabled on a non-GPU platform; forcing chunked prefill and prefix caching to be
disabled"). The engines therefore run DeepSeek-V3 with ``VLLM_MLA_DISABLE=1`` (vLLM's own switch
to its non-absorbed attention path: same model, same weights, K/V cached per head) and
``--block-size 32`` (the CPU attention backend needs multiples of 32).

Both engines also carry ``ExampleConnector`` (KV saved to and loaded from a shared directory, by
prompt tokens): the one KV connector found to move real KV between two vllm-cpu processes here.
It ignores ``kv_transfer_params`` and returns none, so the proxy sends decode the plain request
and the decode engine finds the prefill's KV in the directory.

Greedy tokens depend on whether a prompt's prefix came from cache (the tail is then computed
against cached K/V, a different reduction order in bfloat16), so every comparison of tokens
below is between two requests that meet the same cache state.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest

from proxy.harness import call, free_ports, sse_documents, streamed_text, wait_until
from proxy.server.app import ProxyServer
from proxy.server.config import ProxyConfig
from scheduling.prefix_index import CONFIRMED

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

BLOCK = 32
SYSTEM = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. "
          "A proxy sends each request to the instance that already holds the longest matching prefix. ") * 3


def _healthy(url):
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def vllm_pair(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("vllm")
    logs = tmp_path_factory.mktemp("vllm_logs")
    kv_store = tmp_path_factory.mktemp("vllm_kv_store")
    ports = free_ports(4)
    servers, procs = [], []
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_MLA_DISABLE": "1", "VLLM_SERVER_DEV_MODE": "1",
           "VLLM_DISABLE_COMPILE_CACHE": "1"}
    t0 = time.time()
    try:
        for k in range(2):
            http_port, kv_port = ports[2 * k], ports[2 * k + 1]
            events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{kv_port}"}
            connector = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                         "kv_connector_extra_config": {"shared_storage_path": str(kv_store)}}
            log = open(logs / f"vllm{k}.log", "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_checkpoint),
                 "--served-model-name", "tiny-dsv3", "--host", "127.0.0.1", "--port", str(http_port),
                 "--enforce-eager", "--max-model-len", "1024", "--block-size", str(BLOCK),
                 "--enable-prefix-caching", "--enable-prompt-tokens-details",
                 "--kv-events-config", json.dumps(events), "--kv-transfer-config", json.dumps(connector)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            servers.append((f"http://127.0.0.1:{http_port}", f"tcp://127.0.0.1:{kv_port}"))
        deadline = time.time() + 600
        while not all(_healthy(url) for url, _ in servers):
            for k, p in enumerate(procs):
                if p.poll() is not None:
                    raise RuntimeError(f"vLLM {k} exited: {(logs / f'vllm{k}.log').read_text()[-3000:]}")
            if time.time() > deadline:
                raise RuntimeError("vLLM did not become healthy in 600 s")
            time.sleep(1)
        print(f"two vLLM engines healthy after {time.time() - t0:.0f} s", file=sys.stderr)
        yield servers
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


async def _proxy(servers, tiny_checkpoint, **options):
    options.setdefault("policy", "omni")
    config = ProxyConfig(mode="collocated", instances=[u for u, _ in servers], port=0,
                         tokenizer=str(tiny_checkpoint), block_size=BLOCK,
                         kv_events={u: e for u, e in servers}, **options)
    proxy = await ProxyServer(config).start()
    await asyncio.sleep(0.5)  # SUB sockets connect before the first events
    return proxy


def _chat(question, **extra):
    return {"model": "tiny-dsv3", "temperature": 0, "max_tokens": 6,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}], **extra}


def test_real_vllm_kv_events_feed_the_index_and_routing(vllm_pair, tiny_checkpoint):
    async def scenario():
        proxy = await _proxy(vllm_pair, tiny_checkpoint)
        try:
            async with aiohttp.ClientSession() as s:
                body = _chat("What is the capital of France?")
                status, text, _ = await call(s, proxy.url, body, rid="real-1", chat=True)
                assert status == 200, text
                doc = json.loads(text)
                ids = proxy.tokenizer.prompt_ids(body, chat=True)
                assert doc["usage"]["prompt_tokens"] == len(ids)  # the proxy tokenizes as vLLM does
                keys = proxy.hasher.keys(ids)
                assert len(keys) == len(ids) // BLOCK >= 3
                served = [u for u, _ in vllm_pair
                          if proxy.metrics.decisions.labels("collocated", u, "load")._value.get() == 1]
                assert len(served) == 1
                first = served[0]
                # vLLM's BlockStored events carry exactly the hashes the proxy computed
                await wait_until(lambda: all(proxy.index._entries[first].get(k) == CONFIRMED for k in keys), 10)
                other = next(u for u, _ in vllm_pair if u != first)
                assert proxy.index.match(keys) == {first: len(keys), other: 0}
                # the answer is what the instance gives directly: asked again through the proxy
                # (prefix match: same instance, prompt now cached) and directly (cached too)
                status, text, _ = await call(s, proxy.url, body, rid="real-1b", chat=True)
                assert proxy.metrics.decisions.labels("collocated", first, "prefix")._value.get() == 1
                async with s.post(first + "/v1/chat/completions", json=body) as r:
                    direct = await r.json()
                assert json.loads(text)["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]

                # same system prompt, new question: routed by prefix to the same instance, and
                # vLLM reports the cached blocks
                status, text, _ = await call(s, proxy.url, _chat("How many experts are active per token?"),
                                             rid="real-2", chat=True)
                assert status == 200, text
                assert proxy.metrics.decisions.labels("collocated", first, "prefix")._value.get() == 2
                cached = json.loads(text)["usage"]["prompt_tokens_details"]["cached_tokens"]
                assert cached >= (len(keys) - 1) * BLOCK

                # AllBlocksCleared from vLLM empties the instance's entries (vLLM publishes events
                # from its next engine step: a short request, without a full block, makes one)
                async with s.post(first + "/reset_prefix_cache") as r:
                    assert r.status == 200
                async with s.post(first + "/v1/completions", json={"model": "tiny-dsv3", "prompt": "hi", "max_tokens": 1}) as r:
                    assert r.status == 200
                await wait_until(lambda: proxy.index.size(first) == 0, 10)
            text = proxy.metrics.render().decode()
            assert f'omni_proxy_kv_events_total{{instance="{first}",type="BlockStored"}}' in text
            assert f'omni_proxy_kv_events_total{{instance="{first}",type="AllBlocksCleared"}}' in text
            assert sum(sub.bad_messages for sub in proxy.subscribers.values()) == 0
        finally:
            await proxy.stop()

    asyncio.run(scenario())


def test_real_vllm_streaming_through_the_proxy(vllm_pair, tiny_checkpoint):
    async def scenario():
        proxy = await _proxy(vllm_pair, tiny_checkpoint, policy="round_robin")
        try:
            async with aiohttp.ClientSession() as s:
                for k in range(2):  # one on each instance
                    body = _chat(f"Tell me about experts, round {k}.", stream=True, return_token_ids=True,
                                 stream_options={"include_usage": True})
                    plain = {key: v for key, v in body.items() if key not in ("stream", "stream_options")}
                    async with s.post(vllm_pair[k][0] + "/v1/chat/completions", json=plain) as r:
                        assert r.status == 200  # warm the prompt: the two compared requests hit the cache
                    status, text, _ = await call(s, proxy.url, body, rid=f"stream-{k}", chat=True)
                    assert status == 200, text
                    docs = sse_documents(text)
                    assert docs[-1] == "[DONE]"
                    usage = docs[-2]["usage"]
                    ids = proxy.tokenizer.prompt_ids(body, chat=True)
                    assert usage["completion_tokens"] == 6 and usage["prompt_tokens"] == len(ids)
                    prompt_ids = next(d["prompt_token_ids"] for d in docs[:-1] if d.get("prompt_token_ids"))
                    assert prompt_ids == ids  # token for token, the proxy's tokenization is vLLM's
                    streamed = [t for d in docs[:-1] for c in d.get("choices", []) for t in (c.get("token_ids") or [])]
                    async with s.post(vllm_pair[k][0] + "/v1/chat/completions", json=plain) as r:
                        direct = await r.json()
                    assert streamed == direct["choices"][0]["token_ids"] and len(streamed) == 6
                # and completions with a bad field are the instance's 4xx, passed through
                async with s.post(proxy.url + "/v1/completions",
                                  json={"model": "tiny-dsv3", "prompt": "x", "max_tokens": 5000}) as r:
                    assert r.status == 400 and "1024" in (await r.text())
        finally:
            await proxy.stop()

    asyncio.run(scenario())


def test_real_vllm_pd_through_the_proxy_moves_kv_with_example_connector(vllm_pair, tiny_checkpoint):
    async def scenario():
        (prefill, _), (decode, _) = vllm_pair
        config = ProxyConfig(mode="pd", prefill=[prefill], decode=[decode], port=0, policy="omni",
                             policy_options={"bypass_tokens": 0}, tokenizer=str(tiny_checkpoint), block_size=BLOCK)
        proxy = await ProxyServer(config).start()
        try:
            async with aiohttp.ClientSession() as s:
                body = _chat("Why is decoding slow? Explain the key value cache.", return_token_ids=True)
                status, text, _ = await call(s, proxy.url, body, rid="pd-real", chat=True)
                assert status == 200, text
                doc = json.loads(text)
                n = len(proxy.tokenizer.prompt_ids(body, chat=True))
                aligned = (n - 1) // BLOCK * BLOCK
                # the decode engine never saw this prompt, yet found its KV: the prefill's, moved by
                # the connector
                assert doc["usage"]["prompt_tokens"] == n
                assert doc["usage"]["prompt_tokens_details"]["cached_tokens"] == aligned > 0
                assert proxy.metrics.decisions.labels("prefill", prefill, "load")._value.get() == 1
                # same tokens as the prefill engine gives for the prompt, its prefix cached there too
                async with s.post(prefill + "/v1/chat/completions", json=body) as r:
                    direct = await r.json()
                assert direct["usage"]["prompt_tokens_details"]["cached_tokens"] == aligned
                assert doc["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
            text = proxy.metrics.render().decode()
            assert 'omni_proxy_pd_fallbacks_total{reason="no_kv_transfer_params"} 1.0' in text
        finally:
            await proxy.stop()

    asyncio.run(scenario())


def test_real_vllm_surface_and_hostile_fields_through_the_proxy(vllm_pair, tiny_checkpoint):
    """/tokenize, /detokenize, /version, /v1/responses and n pass through to real vLLM; bad content
    and forged kv_transfer_params never reach it."""
    async def scenario():
        proxy = await _proxy(vllm_pair, tiny_checkpoint, policy="round_robin")
        try:
            async with aiohttp.ClientSession() as s:
                direct = vllm_pair[0][0]
                body = {"model": "tiny-dsv3", "prompt": SYSTEM}
                async with s.post(proxy.url + "/tokenize", json=body) as r:
                    via = await r.json()
                    assert r.status == 200
                async with s.post(direct + "/tokenize", json=body) as r:
                    assert await r.json() == via  # both engines serve the same model
                assert via["tokens"] == proxy.tokenizer.prompt_ids(body, chat=False)
                async with s.post(proxy.url + "/detokenize", json={"model": "tiny-dsv3", "tokens": via["tokens"]}) as r:
                    assert r.status == 200 and SYSTEM.strip() in (await r.json())["prompt"]
                async with s.get(proxy.url + "/version") as r, s.get(direct + "/version") as d:
                    assert r.status == 200 and await r.json() == await d.json()
                # n passes through: vLLM generates every choice
                status, text, _ = await call(s, proxy.url, {"model": "tiny-dsv3", "prompt": "Once upon a time",
                                                             "max_tokens": 4, "n": 3, "temperature": 1.0, "seed": 1})
                doc = json.loads(text)
                assert status == 200 and [c["index"] for c in doc["choices"]] == [0, 1, 2]
                assert doc["usage"]["completion_tokens"] == 12
                # the Responses API, whole and streamed
                rbody = {"model": "tiny-dsv3", "input": "Say something.", "max_output_tokens": 4}
                async with s.post(proxy.url + "/v1/responses", json=rbody) as r:
                    resp = await r.json()
                    # 4 tokens: vLLM calls that "incomplete" (reason max_output_tokens)
                    assert r.status == 200 and resp["object"] == "response" and resp["status"] == "incomplete", resp
                    assert resp["output"] and resp["incomplete_details"] == {"reason": "max_output_tokens"}
                async with s.post(proxy.url + "/v1/responses", json=dict(rbody, stream=True)) as r:
                    events = [b for b in (await r.text()).split("\n\n") if b]
                    assert r.status == 200 and events[0].startswith("event: response.created")
                    # vLLM 0.32 ends the stream with response.completed even for an incomplete response
                    assert events[-1].startswith("event: response.completed"), events[-1][:200]
                    assert not any(e.startswith("event: error") for e in events)
                # a forged KV pull from a port nobody listens on would fail in the engine's connector;
                # dropped, the request is served as if it had none
                forged = {"do_remote_prefill": True, "remote_engine_id": "x", "remote_host": "127.0.0.1",
                          "remote_port": 9, "remote_block_ids": [1], "remote_request_id": "x"}
                status, text, _ = await call(s, proxy.url, {"model": "tiny-dsv3", "prompt": "hello", "max_tokens": 2,
                                                             "kv_transfer_params": forged})
                assert status == 200, text
                assert proxy.metrics.dropped_fields.labels("kv_transfer_params")._value.get() == 1
                status, text, _ = await call(s, proxy.url, {"model": "tiny-dsv3", "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, chat=True)
                assert status == 400 and "image_url.url" in text
        finally:
            await proxy.stop()

    asyncio.run(scenario())
