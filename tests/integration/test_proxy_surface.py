"""The OpenAI surface: the simulator's n / list prompts / stop / unknown model / tokenizer, and the
proxy's pass-through of /tokenize, /detokenize, /version, /v1/models and /v1/responses."""

import json

import aiohttp
import pytest

from proxy.harness import Cluster, Process, call, free_ports, sse_documents, streamed_text
from proxy.sim.profile import SimProfile
from proxy.sim.server import SimInstance
from proxy.wire.tokens import HFTokenizer

pytestmark = pytest.mark.asyncio

FAST = SimProfile(step_overhead_s=0.001, decode_seq_s=1e-5)
PROMPT = "The quick brown fox jumps over the lazy dog. " * 8


async def get_json(s, url, method="GET", body=None):
    async with s.request(method, url, json=body) as r:
        return r.status, await r.json()


# -- the simulator speaks more of vLLM's API ----------------------------------------------------------
async def test_sim_list_prompts_times_n_in_vllm_order_with_usage():
    async with await Cluster.start("collocated", collocated=1, profile=FAST) as c:
        sim = c.sims[0]
        async with aiohttp.ClientSession() as s:
            status, text, _ = await call(s, c.proxy.url, {"prompt": ["first prompt", "a second, longer prompt"],
                                                          "n": 2, "max_tokens": 3}, rid="lp")
            doc = json.loads(text)
            assert status == 200 and [ch["index"] for ch in doc["choices"]] == [0, 1, 2, 3]
            assert [ch["text"] for ch in doc["choices"]] == [sim.engine.records[f"lp-{k}"]["output"] for k in range(4)]
            assert [sim.engine.records[f"lp-{k}"]["prompt_tokens"] for k in range(4)] == [3, 3, 6, 6]
            assert doc["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
            status, text, _ = await call(s, c.proxy.url, {"messages": [{"role": "user", "content": "hi"}], "n": 3,
                                                          "max_tokens": 2}, rid="cn", chat=True)
            assert [ch["message"]["content"] for ch in json.loads(text)["choices"]] == [
                sim.engine.records[f"cn-{k}"]["output"] for k in range(3)]


@pytest.mark.parametrize("stream", [False, True])
async def test_sim_stop_strings(stream):
    async with await Cluster.start("collocated", collocated=1, profile=FAST) as c:
        sim = c.sims[0]
        async with aiohttp.ClientSession() as s:
            await call(s, c.proxy.url, {"prompt": PROMPT, "max_tokens": 10}, rid="st")  # learn the output
            full = sim.engine.records["st"]["output"]
            stop = full.split()[4]  # the fifth word
            body = {"prompt": PROMPT, "max_tokens": 10, "stop": [stop], "stream": stream}
            status, text, _ = await call(s, c.proxy.url, body, rid="st")
        assert status == 200
        want = full[: full.index(" " + stop) + 1]
        if stream:
            docs = sse_documents(text)
            assert streamed_text(docs, False) == want and docs[-2]["choices"][0]["finish_reason"] == "stop"
            assert docs[-2]["choices"][0]["stop_reason"] == stop
        else:
            choice = json.loads(text)["choices"][0]
            assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (want, "stop", stop)


async def test_sim_answers_404_for_a_model_it_does_not_serve():
    async with await Cluster.start("collocated", collocated=1, profile=FAST) as c:
        async with aiohttp.ClientSession() as s:
            for chat in (False, True):
                body = {"model": "gpt-9", "max_tokens": 2}
                body.update({"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"})
                status, text, _ = await call(s, c.proxy.url, body, chat=chat)
                err = json.loads(text)["error"]
                assert status == 404 and err == {"message": "The model `gpt-9` does not exist. Valid aliases: sim-model.",
                                                 "type": "NotFoundError", "param": "model", "code": 404}
            status, _, _ = await call(s, c.proxy.url, {"model": "sim-model", "prompt": "x", "max_tokens": 1})
            assert status == 200


async def test_sim_with_a_real_tokenizer_counts_and_routes_like_vllm(tiny_checkpoint):
    tok = HFTokenizer(str(tiny_checkpoint))
    sims = [await SimInstance(0, "collocated", FAST, kv_events_port=0, tokenizer=tok).start() for _ in range(2)]
    from proxy.server.app import ProxyServer
    from proxy.server.config import ProxyConfig

    proxy = await ProxyServer(ProxyConfig(mode="collocated", instances=[x.url for x in sims], port=0,
                                          tokenizer=str(tiny_checkpoint), kv_events={x.url: x.kv_endpoint for x in sims})).start()
    try:
        async with aiohttp.ClientSession() as s:
            chat = {"messages": [{"role": "system", "content": PROMPT}, {"role": "user", "content": "one"}],
                    "max_tokens": 2}
            status, text, _ = await call(s, proxy.url, chat, rid="t-1", chat=True)
            ids = tok.prompt_ids(chat, chat=True)
            assert status == 200 and json.loads(text)["usage"]["prompt_tokens"] == len(ids) > 20
            first = next(x for x in sims if "t-1" in x.engine.records)
            status, doc = await get_json(s, first.url + "/tokenize", "POST", {"prompt": PROMPT})
            assert doc["tokens"] == tok.tokenizer.encode(PROMPT) and doc["count"] == len(doc["tokens"])
            status, doc = await get_json(s, first.url + "/detokenize", "POST", {"tokens": doc["tokens"]})
            assert doc["prompt"] == tok.tokenizer.decode(tok.tokenizer.encode(PROMPT))
            import asyncio

            await asyncio.sleep(0.3)  # KV events reach the proxy
            chat["messages"][1]["content"] = "two"
            status, text, _ = await call(s, proxy.url, chat, rid="t-2", chat=True)
            assert "t-2" in first.engine.records and first.engine.records["t-2"]["cached_tokens"] >= 16
    finally:
        await proxy.stop()
        for x in sims:
            await x.stop()


async def test_sim_tokenizer_flag(tiny_checkpoint):
    port, = free_ports(1)
    with Process(["sim", "--port", str(port), "--tokenizer", str(tiny_checkpoint)]):
        async with aiohttp.ClientSession() as s:
            status, doc = await get_json(s, f"http://127.0.0.1:{port}/tokenize", "POST", {"prompt": PROMPT})
    assert status == 200 and doc["tokens"] == HFTokenizer(str(tiny_checkpoint)).tokenizer.encode(PROMPT)


# -- the proxy passes the rest of the surface through ---------------------------------------------------
async def test_tokenize_detokenize_version_models_pass_through_in_both_modes():
    for mode, sizes in (("collocated", {"collocated": 2}), ("pd", {"prefill": 1, "decode": 1})):
        async with await Cluster.start(mode, profile=FAST, **sizes) as c:
            async with aiohttp.ClientSession() as s:
                status, tokens = await get_json(s, c.proxy.url + "/tokenize", "POST", {"prompt": PROMPT})
                assert status == 200 and tokens["count"] == 90
                served = [x for x in c.sims if x._pieces]  # the instance that tokenized learnt the pieces
                assert len(served) == 1 and (mode == "collocated" or served[0].role == "decode")
                direct = await get_json(s, served[0].url + "/tokenize", "POST", {"prompt": PROMPT})
                assert direct == (200, tokens)
                status, text = await get_json(s, c.proxy.url + "/detokenize", "POST", {"tokens": tokens["tokens"]})
                if status == 200:  # the instance that learnt the ids answered
                    assert text == {"prompt": PROMPT}
                status, version = await get_json(s, c.proxy.url + "/version")
                assert status == 200 and version["version"].startswith("omni-sim")
                status, models = await get_json(s, c.proxy.url + "/v1/models")
                assert status == 200 and models["data"][0]["id"] == "sim-model"
                status, err = await get_json(s, c.proxy.url + "/tokenize", "POST", {"prompt": "x", "model": "nope"})
                assert status == 404 and err["error"]["type"] == "NotFoundError"  # the instance's answer


async def test_passthrough_moves_on_from_a_failing_instance():
    async with await Cluster.start("collocated", collocated=2, profile=FAST) as c:
        a, b = c.sims
        await a.refuse_for(5)
        async with aiohttp.ClientSession() as s:
            for _ in range(4):
                status, version = await get_json(s, c.proxy.url + "/version")
                assert status == 200 and version["version"] == f"omni-sim {b.engine_id}"


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_pass_through_and_follow_ups_return_to_their_instance(stream):
    async with await Cluster.start("collocated", collocated=3, profile=FAST, policy="round_robin") as c:
        async with aiohttp.ClientSession() as s:
            body = {"model": "sim-model", "input": "Tell me a story.", "max_output_tokens": 4, "stream": stream}
            async with s.post(c.proxy.url + "/v1/responses", json=body, headers={"X-Request-Id": "r1"}) as r:
                assert r.status == 200
                text = await r.text()
            if stream:
                events = [b for b in text.split("\n\n") if b]
                assert events[0].startswith("event: response.created") and events[-1].startswith("event: response.completed")
                first = json.loads(events[-1].split("data: ", 1)[1])["response"]
            else:
                first = json.loads(text)
            owner = next(x for x in c.sims if first["id"] in x.responses_store)
            assert first["id"] == "resp_r1" and first["output"][0]["content"][0]["text"] == owner.engine.records["r1"]["output"]
            for k in range(3):  # round robin would send these elsewhere; they go back to the owner
                follow = {"model": "sim-model", "input": f"and then {k}?", "previous_response_id": first["id"],
                          "max_output_tokens": 2}
                async with s.post(c.proxy.url + "/v1/responses", json=follow, headers={"X-Request-Id": f"r1-{k}"}) as r:
                    assert r.status == 200, await r.text()
                assert f"r1-{k}" in owner.engine.records
            status, doc = await get_json(s, c.proxy.url + f"/v1/responses/{first['id']}")
            assert status == 200 and doc["id"] == first["id"] and doc["status"] == "completed"
            status, doc = await get_json(s, c.proxy.url + f"/v1/responses/{first['id']}/cancel", "POST", {})
            assert status == 400 and "synchronous" in doc["error"]["message"]  # the instance's own answer
            status, doc = await get_json(s, c.proxy.url + "/v1/responses/resp_unknown")
            assert status == 404 and "not produced through this proxy" in doc["error"]["message"]
            status, doc = await get_json(s, c.proxy.url + "/v1/responses", "POST", {"model": "sim-model"})
            assert status == 400 and doc["error"]["param"] == "input"


async def test_responses_are_refused_in_pd_mode_with_a_501():
    async with await Cluster.start("pd", prefill=1, decode=1, profile=FAST) as c:
        async with aiohttp.ClientSession() as s:
            status, doc = await get_json(s, c.proxy.url + "/v1/responses", "POST", {"input": "x"})
            assert status == 501 and "pd mode" in doc["error"]["message"]
            assert not c.sims[0].engine.records and not c.sims[1].engine.records
