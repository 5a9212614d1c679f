"""The sink+recent prefill kernel (kernels.triton_sink_recent_prefill) run by Triton's CPU
interpreter (TRITON_INTERPRET=1) against attention over every visible key at once
(``kv_prefill.sink_recent_prefill_reference``), and the host side that tells it which cached rows
to read (``kv_cuda.prefill_host``), on a paged cache whose freed blocks are poisoned.

Cases: no context, context shorter than the sink, inside the window, far beyond it; windows of 1
token, of none (sink 0), longer than the prompt; query blocks and key tiles cut across the
sink/window seams; fp32 and fp16; DeepSeek's head split (128 + 64, v 128). The CUDA run is
tests/gpu/vllm/test_sink_recent_kv_cuda.py.
"""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch

from omni_passes.testing.triton_interpret import run_interpreted

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

_SCRIPT = textwrap.dedent(
    """
    import math, torch
    from kernels.triton_sink_recent_prefill import prefill_plan, sink_recent_prefill_attention as kernel
    from omni_passes.hosts.vllm.kv_prefill import context_positions, sink_recent_prefill_reference as reference

    def case(lens, contexts, sink, recent, H=2, D1=32, D2=16, DV=16, dtype=torch.float32, block_n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        T, D = starts[-1], D1 + D2
        q, k = (torch.randn(T, H, D, generator=g).to(dtype) for _ in range(2))
        v = torch.randn(T, H, DV, generator=g).to(dtype)
        cache = [(torch.randn(c, H, D, generator=g).to(dtype), torch.randn(c, H, DV, generator=g).to(dtype))
                 for c in contexts]
        pos = [context_positions(c, sink, recent) for c in contexts]
        k_ctx = torch.cat([cache[r][0][p] for r, p in enumerate(pos)])
        v_ctx = torch.cat([cache[r][1][p] for r, p in enumerate(pos)])
        plan = prefill_plan(starts, contexts, [len(p) for p in pos], "cpu")
        scale = 1 / math.sqrt(D)
        out = kernel(q, k, v[:, :, :DV], k_ctx, v_ctx, plan, sink, recent, scale, D1, block_n=block_n)
        ref = reference(q, k, v, starts, contexts, sink, recent, scale, lambda r, p: (cache[r][0][p], cache[r][1][p]))
        assert out.dtype == dtype and out.shape == (T, H, DV)
        return (out.double() - ref.double()).abs().max().item()

    n = 0
    for sink, recent in [(0, 16), (16, 32), (32, 16), (48, 1), (16, 400), (20, 30)]:
        for lens, contexts in [([1, 7, 90], [0, 0, 0]), ([40, 9], [100, 3]), ([70], [200]), ([5, 130], [0, 1000]),
                               ([64, 65], [16, 47])]:
            err = case(lens, contexts, sink, recent)
            assert err < 1e-5, (sink, recent, lens, contexts, err)
            n += 1
    # fp16, and DeepSeek's split of the head (nope 128 + rope 64, v 128) with 64-key tiles
    assert case([70, 150], [0, 300], 20, 30, dtype=torch.float16) < 5e-3
    assert case([150, 3], [600, 60], 64, 128, H=2, D1=128, D2=64, DV=128, dtype=torch.float16, block_n=64) < 5e-3
    # a value view of a wider tensor (vLLM splits k_nope and v out of one up-projection)
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(50, 2, 48 + 16)
    plan = prefill_plan([0, 50], [0], [0], "cpu")
    q, k = torch.randn(50, 2, 48), torch.randn(50, 2, 48)
    out = kernel(q, k, kv[..., 48:], torch.zeros(0, 2, 48), torch.zeros(0, 2, 16), plan, 4, 8, 0.2, 32)
    ref = reference(q, k, kv[..., 48:].contiguous(), [0, 50], [0], 4, 8, 0.2, None)
    assert (out - ref).abs().max().item() < 1e-5
    # bench attn-prefill: a launch variant the kernel refuses is reported, the others still run;
    # the default launch must run (the check uses it)
    from omni_passes.bench.attn_prefill import launchable
    run = lambda **tune: kernel(q, k, kv[..., 48:], torch.zeros(0, 2, 48), torch.zeros(0, 2, 16), plan, 4, 8, 0.2,
                                32, **tune)
    launched, failed = launchable([{}, {"block_n": 48}, {"block_n": 32}], run)
    assert launched == {0, 2} and list(failed) == [1] and "power of 2" in failed[1], failed
    try:
        launchable([{"block_n": 48}], run)
        refused = None
    except Exception as exc:
        refused = str(exc)
    assert refused is not None and "power of 2" in refused, refused
    print("ok", n + 3)
    """
)


@needs_triton
def test_prefill_kernel_in_interpreter_mode_equals_attention_over_every_visible_key():
    assert run_interpreted(_SCRIPT).strip() == "ok 33"


@needs_triton
def test_bad_shapes_and_cpu_tensors_are_refused(monkeypatch):
    from kernels.triton_sink_recent_prefill import (
        prefill_plan,
        sink_recent_prefill_attention,
    )

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plan = prefill_plan([0, 4], [10], [3], "cpu")
    q = torch.zeros(4, 2, 48)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        sink_recent_prefill_attention(q, q, torch.zeros(4, 2, 16), torch.zeros(3, 2, 48), torch.zeros(3, 2, 16),
                                      plan, 2, 4, 0.1, 32)
    with pytest.raises(ValueError, match=r"head dims \(nope 24, rope 24, v 16\) must be powers of two"):
        sink_recent_prefill_attention(q, q, torch.zeros(4, 2, 16), torch.zeros(3, 2, 48), torch.zeros(3, 2, 16),
                                      plan, 2, 4, 0.1, 24)
    with pytest.raises(ValueError, match="the plan has 4 tokens and 3 context rows; got 4 and 5"):
        sink_recent_prefill_attention(q, q, torch.zeros(4, 2, 16), torch.zeros(5, 2, 48), torch.zeros(5, 2, 16),
                                      plan, 2, 4, 0.1, 32)
    with pytest.raises(ValueError, match="request 0 has 4 new tokens after 10 cached ones, 11 of them visible"):
        prefill_plan([0, 4], [10], [11], "cpu")


@needs_triton
@pytest.mark.parametrize("sink, recent, block_size", [(16, 32, 16), (0, 16, 16), (64, 128, 16), (16, 48, 8)])
def test_prefill_reads_only_the_visible_rows_of_a_cache_with_freed_blocks(sink, recent, block_size):
    """``prefill_host`` + ``context_rows`` on a paged cache laid out as the sink+recent manager
    leaves it: blocks no later query reads are gone (the null block 0 in the table, poisoned
    with NaN here); every row it returns is the right position's, none is poisoned."""
    from omni_passes.hosts.vllm.kv_cuda import prefill_host
    from omni_passes.hosts.vllm.kv_prefill import context_positions
    from omni_passes.kvcache.window import SinkRecentWindow

    window = SinkRecentWindow(sink, recent, block_size)
    contexts, lens = [0, 5, 100, 333, 40], [30, 200, 7, 64, 1]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    max_blocks = max(-(-(c + n) // block_size) for c, n in zip(contexts, lens))
    generator = torch.Generator().manual_seed(0)
    ids = 1 + torch.randperm(len(contexts) * max_blocks, generator=generator)
    table = ids.view(len(contexts), max_blocks).to(torch.int32)
    cache = torch.full((1 + table.numel(), block_size, 3), float("nan"))
    for r, context in enumerate(contexts):
        for position in range(context):
            cache[table[r, position // block_size], position % block_size] = torch.tensor([r, position, 1.0])
        for block in window.freeable_blocks(context):  # what the manager has freed before this chunk
            table[r, block] = 0
    host = prefill_host(starts, contexts, sink, recent, "cpu")
    assert host.plan is not None and host.plan.num_tokens == starts[-1]
    rows = host.context_rows(cache, table)
    assert not rows.isnan().any()
    expected = torch.cat([torch.stack([torch.full_like(p, r), p], 1) for r, p in
                          enumerate(context_positions(c, sink, recent) for c in contexts)])
    assert torch.equal(rows[:, :2].long(), expected)
    assert host.plan.ctx_starts.tolist() == [0] + torch.tensor(
        [len(context_positions(c, sink, recent)) for c in contexts]).cumsum(0).tolist()


@needs_triton
def test_a_batch_within_the_window_keeps_vllms_own_prefill():
    from omni_passes.hosts.vllm.kv_cuda import prefill_host

    assert prefill_host([0, 30, 48], [100, 0], 64, 128, "cpu").plan is None      # ends 130, 18 <= 192
    assert prefill_host([0, 30, 48], [163, 0], 64, 128, "cpu").plan is not None  # 193 > 192


@pytest.mark.parametrize("chunk, context, sink, recent", [(50, 0, 8, 16), (50, 100, 8, 16), (10, 3, 0, 4),
                                                          (64, 5, 16, 400)])
def test_the_prefill_benchmark_counts_exactly_the_visible_pairs(chunk, context, sink, recent):
    from omni_passes.bench.attn_prefill import dense_pairs, visible_pairs

    def visible(p, key):
        return key <= p and (key < sink or key > p - recent)

    queries = range(context, context + chunk)
    assert visible_pairs(chunk, context, sink, recent) == sum(visible(p, key) for p in queries for key in range(p + 1))
    assert dense_pairs(chunk, context) == sum(p + 1 for p in queries)
