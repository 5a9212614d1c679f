import json

import pytest

from proxy.server.intake import Intake, SharedBody
from proxy.server.prepare import PREFILL_KV_PARAMS, PrepareSpec, prepare, scrub
from proxy.wire.openai import RequestError
from proxy.wire.text import char_block_ids
from proxy.wire.tokens import CharBlockTokenizer
from scheduling.block_hash import BlockHasher


def spec(mode="collocated", **kw):
    return PrepareSpec(mode, None, 4, 16, "sha256", "vllm-none-hash", 16, True, **kw)


def run(body, mode="collocated", chat=False, **kw):
    s = spec(mode, **kw)
    return prepare(json.dumps(body).encode(), chat, s, CharBlockTokenizer(4), BlockHasher(16))


def test_scrub_drops_steering_fields_at_top_level_and_in_vllm_xargs():
    body = {"prompt": "x", "kv_transfer_params": {"remote_host": "evil"}, "ec_transfer_params": {},
            "vllm_xargs": {"kv_transfer_params": "{}", "ec_transfer_params": 1, "mine": 2}}
    assert scrub(body) == ("kv_transfer_params", "ec_transfer_params", "vllm_xargs.kv_transfer_params",
                           "vllm_xargs.ec_transfer_params")
    assert body == {"prompt": "x", "vllm_xargs": {"mine": 2}}
    assert scrub(body) == ()


@pytest.mark.parametrize("mode", ["collocated", "pd"])
def test_forged_params_never_reach_any_payload(mode):
    body = {"prompt": "hello world " * 20, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
            "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "10.9.9.9"},
            "vllm_xargs": {"kv_transfer_params": "x"}}
    p = run(body, mode)
    assert p.dropped == ("kv_transfer_params", "vllm_xargs.kv_transfer_params")
    for payload in (p.payload, p.decode_base, p.prefill_payload):
        if payload is not None:
            assert b"10.9.9.9" not in payload and b'"vllm_xargs": {}' in payload
    if mode == "collocated":
        assert json.loads(p.payload) == {k: v for k, v in body.items() if k != "kv_transfer_params"} | {"vllm_xargs": {}}
        assert p.decode_base is None and p.prefill_payload is None
    else:
        prefill = json.loads(p.prefill_payload)
        assert prefill["kv_transfer_params"] == PREFILL_KV_PARAMS and prefill["max_tokens"] == 1
        assert prefill["stream"] is False and "stream_options" not in prefill
        ours = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_host": "h", "remote_port": 1}
        decode = json.loads(p.decode_payload(ours))
        assert decode == {k: v for k, v in body.items() if k != "kv_transfer_params"} | {
            "vllm_xargs": {}, "kv_transfer_params": ours}
        assert json.loads(p.decode_payload(None)) == {k: v for k, v in decode.items() if k != "kv_transfer_params"}


def test_untouched_collocated_bodies_are_forwarded_as_sent():
    p = run({"prompt": "abc", "max_tokens": 2})
    assert p.payload is None and p.dropped == ()  # the proxy sends the client's bytes


def test_routing_fields_and_block_keys():
    text = "abcd" * 100  # 100 tokens: 6 full blocks of 16
    p = run({"prompt": [text, "other"], "max_tokens": 7, "stream": False})
    assert (p.stream, p.max_tokens, p.prompt_tokens) == (False, 7, 100)
    assert p.block_keys() == BlockHasher(16).keys(char_block_ids(text))
    capped = run({"prompt": text}, max_prefix_blocks=2)
    assert capped.block_keys() == BlockHasher(16).keys(char_block_ids(text))[:2] and capped.prompt_tokens == 100


@pytest.mark.parametrize("extra", [{"n": 2}, {"best_of": 4}, {"use_beam_search": True}])
def test_pd_refuses_what_one_prefill_cannot_feed(extra):
    with pytest.raises(RequestError, match="pd mode") as err:
        run({"prompt": "x", **extra}, "pd")
    assert err.value.status == 400
    assert run({"prompt": "x", **extra}).payload is None  # collocated: passed through


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["collocated", "pd"])
async def test_worker_process_prepares_exactly_what_the_loop_would(mode):
    intake = Intake(spec(mode), max_body_bytes=1 << 24, body_timeout=5, offload_bytes=1 << 10, workers=1)
    try:
        body = {"messages": [{"role": "user", "content": "a long question " * 200}], "max_tokens": 3,
                "kv_transfer_params": {"x": 1}}
        raw = json.dumps(body).encode()
        assert intake.offloads(len(raw))
        shared = SharedBody(len(raw))
        for k in range(0, len(raw), 1000):
            shared.append(raw[k:k + 1000])
        got = await intake.prepare(shared, chat=True)
        want = prepare(raw, True, intake.spec, intake.tokenizer, intake.hasher)
        if mode == "collocated":
            assert got.payload == want.payload
        else:
            assert (got.decode_base, got.prefill_payload) == (want.decode_base, want.prefill_payload)
        assert (got.keys, got.prompt_tokens, got.dropped) == (want.keys, want.prompt_tokens, want.dropped)
        bad = SharedBody(4)
        bad.append(b"[1,2")
        with pytest.raises(RequestError, match="not valid JSON"):
            await intake.prepare(bad, chat=True)  # the client's mistake comes back as a 400, not a crash
        with pytest.raises(RequestError, match="longer than its Content-Length"):
            SharedBody(2).append(b"abc")
    finally:
        intake.close()
