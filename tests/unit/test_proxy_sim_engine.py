import asyncio

import pytest

from proxy.sim.engine import WORDS, SimEngine, SimRequest, output_token
from proxy.sim.profile import SimProfile

pytestmark = pytest.mark.asyncio


def request(engine, rid, n_tokens, max_tokens=3, first_token=0):
    ids = list(range(first_token, first_token + n_tokens))
    return SimRequest(rid, ids, engine.digests_of(ids), max_tokens)


async def test_chunked_prefill_under_the_token_budget():
    profile = SimProfile(max_num_batched_tokens=100, block_size=16)
    engine = SimEngine(profile)
    a, b = request(engine, "a", 80), request(engine, "b", 80, first_token=1000)
    engine.add(a)
    engine.add(b)
    decodes, chunks = engine._schedule()
    assert decodes == [] and [(r.rid, n) for r, n in chunks] == [("a", 80), ("b", 20)]
    assert profile.step_time([(0, 80), (0, 20)], 0, 0) == pytest.approx(
        profile.step_overhead_s + profile.prefill_token_s * 100 + profile.prefill_attn_s * (80 * 40 + 20 * 10))
    engine._complete(decodes, chunks)
    assert a.outputs == [output_token(a.base, 0)] and b.computed == 20 and not b.outputs
    decodes, chunks = engine._schedule()
    assert decodes == [a] and [(r.rid, n) for r, n in chunks] == [("b", 60)]  # 100 - 1 decode token


async def test_prefix_cache_hit_skips_cached_blocks_and_publishes_events():
    published = []
    engine = SimEngine(SimProfile(block_size=16), publish=published.extend)
    first = request(engine, "first", 80, max_tokens=1)
    engine.add(first)
    engine._complete(*engine._schedule())
    engine._emit()
    assert first.done and [type(e).__name__ for e in published] == ["BlockStored"]
    assert published[0].block_hashes == first.digests and published[0].token_ids == list(range(80))
    again = request(engine, "again", 80, max_tokens=1)
    engine.add(again)
    decodes, chunks = engine._schedule()
    assert again.cached_tokens == 79 and [(r.rid, n) for r, n in chunks] == [("again", 1)]


async def test_max_num_seqs_and_kv_capacity_hold_requests_back():
    engine = SimEngine(SimProfile(block_size=16, max_num_seqs=1))
    engine.add(request(engine, "a", 16))
    engine.add(request(engine, "b", 16, first_token=100))
    engine._schedule()
    assert len(engine.running) == 1 and len(engine.waiting) == 1
    small = SimEngine(SimProfile(block_size=16, num_kv_blocks=4))
    small.add(request(small, "a", 40, max_tokens=8))   # 3 blocks
    small.add(request(small, "b", 40, max_tokens=8, first_token=100))
    small._schedule()
    assert [r.rid for r in small.running] == ["a"] and [r.rid for r in small.waiting] == ["b"]


async def test_loop_runs_to_completion_in_modelled_time():
    profile = SimProfile(step_overhead_s=0.01, prefill_token_s=1e-4, decode_seq_s=0.0, decode_kv_token_s=0.0,
                         prefill_attn_s=0.0)
    engine = SimEngine(profile)
    engine.start()
    try:
        r = request(engine, "t", 100, max_tokens=5)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        engine.add(r)
        while not r.done:
            await r.wake.wait()
            r.wake.clear()
        elapsed = loop.time() - t0
    finally:
        await engine.stop()
    # one prefill step (0.01 + 100 * 1e-4) then four decode steps of 0.01 s
    assert engine.busy_s == pytest.approx(0.02 + 4 * 0.01)
    assert 0.06 <= elapsed < 0.2
    assert r.text() == "".join(WORDS[output_token(r.base, k)] for k in range(5))
    assert engine.records["t"]["completion_tokens"] == 5 and engine.cache.anonymous == 0


async def test_abort_frees_blocks():
    engine = SimEngine(SimProfile(block_size=16))
    r = request(engine, "x", 40, max_tokens=50)
    engine.add(r)
    engine._schedule()
    assert engine.cache.anonymous > 0
    engine.abort(r)
    assert engine.cache.anonymous == 0 and engine.records["x"]["status"] == "aborted" and not engine.running


async def test_stop_strings_end_a_sequence_and_cut_its_text():
    profile = SimProfile(step_overhead_s=0.0001)
    engine = SimEngine(profile)
    engine.start()
    try:
        probe = request(engine, "s", 20, max_tokens=12)
        full = "".join(WORDS[output_token(probe.base, k)] for k in range(12))
        stop = full[len(full) // 2: len(full) // 2 + 5]  # a string that spans into the middle
        r = SimRequest("s", probe.prompt_ids, probe.digests, 12, stop=(stop, "never-there"))
        engine.add(r)
        while not r.done:
            await r.wake.wait()
            r.wake.clear()
        cut = full.index(stop)
        assert r.finish_reason == "stop" and r.stop_reason == stop
        assert r.text() == full[:cut] and stop not in r.text()
        assert len(r.outputs) < 12 and engine.records["s"]["finish_reason"] == "stop"
        plain = request(engine, "p", 20, max_tokens=4)
        engine.add(plain)
        while not plain.done:
            await plain.wake.wait()
            plain.wake.clear()
        assert plain.finish_reason == "length" and len(plain.outputs) == 4
    finally:
        await engine.stop()
