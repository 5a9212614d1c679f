import importlib.util
import json

import msgpack
import pytest

from proxy.wire import kv_events as kv
from proxy.wire.openai import RequestError, events_end, json_depth_over, looks_like_sse, parse_json_body, validate_request
from proxy.wire.text import char_block_ids, prompt_ids, render_chat


def test_kv_batch_roundtrip_and_layout():
    batch = kv.EventBatch(1.5, [kv.BlockStored([b"\x01" * 32, 7], None, [1, 2], 16, "GPU"),
                                kv.BlockRemoved([b"\x02" * 32], None), kv.AllBlocksCleared()], 0)
    raw = msgpack.unpackb(kv.encode_batch(batch), raw=False)
    assert raw[0] == 1.5 and raw[2] == 0
    assert raw[1][0] == {"type": "BlockStored", "block_hashes": [b"\x01" * 32, 7], "parent_block_hash": None,
                         "token_ids": [1, 2], "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None}
    assert raw[1][1] == {"type": "BlockRemoved", "block_hashes": [b"\x02" * 32], "medium": None}
    assert raw[1][2] == {"type": "AllBlocksCleared"}
    back = kv.decode_batch(kv.encode_batch(batch))
    assert back.events[0].block_hashes == [b"\x01" * 32, 7] and back.events[0].block_size == 16
    assert isinstance(back.events[1], kv.BlockRemoved) and isinstance(back.events[2], kv.AllBlocksCleared)
    topic, seq, payload = kv.frames(b"t", 5, batch)
    assert kv.decode_seq(seq) == 5 and seq == (5).to_bytes(8, "big")


def test_decoder_accepts_array_events_and_skips_unknown_types():
    payload = msgpack.packb([2.0, [["BlockStored", [1, 2], None, [9] * 32, 16, None, "GPU"],
                                   ["BlockRemoved", [1], None], {"type": "SomethingNew", "x": 1}]])
    events = kv.decode_batch(payload).events
    assert [type(e).__name__ for e in events] == ["BlockStored", "BlockRemoved"]
    assert events[0].block_hashes == [1, 2]


@pytest.mark.parametrize("payload, message", [
    (b"\xc1", "not msgpack"),
    (msgpack.packb({"ts": 1}), "not a KVEventBatch"),
    (msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "block_size": 0}]]), "block_size"),
    (msgpack.packb([1.0, [{"type": "BlockRemoved", "block_hashes": "x"}]]), "block_hashes"),
    (msgpack.packb([1.0, [42]]), "neither"),
])
def test_decoder_errors_name_the_problem(payload, message):
    with pytest.raises(kv.KVEventDecodeError, match=message):
        kv.decode_batch(payload)


@pytest.mark.slow  # importing vllm takes ~10 s
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_decoder_reads_what_vllm_publishes():
    import msgspec
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

    batch = KVEventBatch(ts=3.25, events=[
        BlockStored(block_hashes=[b"\xaa" * 32], parent_block_hash=b"\xbb" * 32, token_ids=list(range(16)),
                    block_size=16, lora_id=None, medium="GPU", lora_name=None, group_idx=0),
        BlockRemoved(block_hashes=[b"\xaa" * 32], medium="GPU"), AllBlocksCleared()], data_parallel_rank=0)
    ours = kv.decode_batch(msgspec.msgpack.Encoder().encode(batch))
    assert ours.ts == 3.25 and ours.data_parallel_rank == 0
    stored, removed, cleared = ours.events
    assert stored.block_hashes == [b"\xaa" * 32] and stored.parent_block_hash == b"\xbb" * 32
    assert stored.token_ids == list(range(16)) and stored.group_idx == 0
    assert removed.block_hashes == [b"\xaa" * 32] and isinstance(cleared, kv.AllBlocksCleared)
    # and vLLM's own decoder reads what the simulator publishes
    ours_bytes = kv.encode_batch(kv.EventBatch(1.0, [kv.BlockStored([b"\x01" * 32], None, [1] * 16, 16, "GPU")], 0))
    theirs = msgspec.msgpack.Decoder(type=KVEventBatch).decode(ours_bytes)
    assert theirs.events[0].block_hashes == [b"\x01" * 32] and theirs.data_parallel_rank == 0


def test_char_block_tokenizer():
    assert char_block_ids("abcdefghi", 4) == char_block_ids("abcd", 4) + char_block_ids("efgh", 4) + char_block_ids("i", 4)
    assert len(char_block_ids("x" * 4000, 4)) == 1000
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "U"}]}]}
    assert render_chat(chat["messages"]) == "<|system|>S\n<|user|>U\n<|assistant|>"
    assert prompt_ids(chat, chat=True, chars_per_token=1) == char_block_ids(render_chat(chat["messages"]), 1)
    assert prompt_ids({"prompt": [5, 6, 7]}, chat=False) == [5, 6, 7]
    assert prompt_ids({"prompt": [[5, 6], [7]]}, chat=False) == [5, 6]
    assert prompt_ids({"prompt": ["abcd", "zz"]}, chat=False) == char_block_ids("abcd")


@pytest.mark.parametrize("body, chat, message", [
    ({}, True, "field 'messages' is required for /v1/chat/completions"),
    ({"messages": []}, True, "'messages' must be a non-empty list"),
    ({"messages": [{"content": "x"}]}, True, r"messages\[0\] must be an object with a string 'role'"),
    ({}, False, "field 'prompt' is required for /v1/completions"),
    ({"prompt": {"a": 1}}, False, "field 'prompt' must be"),
    ({"prompt": "x", "max_tokens": 0}, False, "'max_tokens' must be a positive integer, got 0"),
    ({"prompt": "x", "max_tokens": "5"}, False, "'max_tokens' must be a positive integer, got '5'"),
    ({"prompt": "x", "stream": "yes"}, False, "'stream' must be true or false"),
    ({"prompt": "x", "model": 3}, False, "'model' must be a string"),
    ({"prompt": "x", "n": 0}, False, "'n' must be a positive integer"),
    ({"prompt": "x", "n": 3, "best_of": 2}, False, r"'best_of' \(2\) must be at least 'n' \(3\)"),
    ({"prompt": "x", "stop": 5}, False, "'stop' must be a string or a list of strings"),
    ({"prompt": "x", "stop": ["a", 1]}, False, "'stop' must be a string or a list of strings"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, True, "needs field 'text'"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, True, "must be an object with a string 'type'"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": "x"}]}]}, True,
     "needs field 'input_audio'"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}]}, True,
     r"video_url.url must be a string"),
    ({"messages": [{"role": "user", "content": "x", "name": 3}]}, True, r"messages\[0\].name must be a string"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": {}}]}, True, "tool_calls must be a list"),
    ({"messages": [{"role": "system", "content": None}]}, True, r"messages\[0\] \(system\) needs 'content'"),
])
def test_validation_names_field_and_value(body, chat, message):
    with pytest.raises(RequestError, match=message):
        validate_request(body, chat)


def test_body_parsing_errors():
    with pytest.raises(RequestError, match="empty"):
        parse_json_body(b"")
    with pytest.raises(RequestError, match="not valid JSON"):
        parse_json_body(b"{nope")
    with pytest.raises(RequestError, match="must be a JSON object, got list"):
        parse_json_body(b"[1]")
    assert parse_json_body(json.dumps({"a": 1}).encode()) == {"a": 1}


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "developer", "content": [{"type": "text", "text": "rules"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                                  {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                                  {"type": "video_url", "video_url": {"url": "https://x/v.mp4"}}, "bare string"]}],
    [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                           "function": {"name": "f", "arguments": "{}"}}]},
     {"role": "tool", "tool_call_id": "c", "content": "ok"}],
    [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],
])
def test_openai_message_shapes_are_accepted(messages):
    validate_request({"messages": messages}, chat=True)


def test_json_nesting_is_limited_at_the_stated_depth():
    def nested(depth):  # the body object counts as level 1
        return b'{"prompt": "x", "a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert parse_json_body(nested(400))["prompt"] == "x"
    for depth in (401, 999, 5000, 100_000):
        with pytest.raises(RequestError, match="more than 400 levels deep"):
            parse_json_body(nested(depth))
    wide = json.dumps({"prompt": "x", "a": [[1]] * 10_000}).encode()  # many brackets, shallow
    assert len(parse_json_body(wide)["a"]) == 10_000
    assert parse_json_body(nested(10), max_depth=10) and not json_depth_over({"a": [[]]}, 3)
    with pytest.raises(RequestError):
        parse_json_body(nested(11), max_depth=10)


def test_sse_event_boundaries():
    assert events_end(b"data: a\n\ndata: b") == len(b"data: a\n\n")
    assert events_end(b"data: a\r\n\r\ndata: b\n\n") == len(b"data: a\r\n\r\ndata: b\n\n")
    assert events_end(b"data: partial") == 0
    assert looks_like_sse(b"data: {}\n\n") and looks_like_sse(b": keep-alive\n\n")
    assert looks_like_sse(b"event: response.created\ndata: {}\n\n")
    assert not looks_like_sse(b"<html><body>Bad Gateway</body></html>\n\n")


def test_request_error_survives_a_process_pool():
    import pickle

    err = pickle.loads(pickle.dumps(RequestError("too big", 413, "prompt")))
    assert (err.message, err.status, err.param) == ("too big", 413, "prompt")
