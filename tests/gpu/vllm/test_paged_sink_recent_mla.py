"""The paged sink+recent MLA decode kernel (kernels.triton_paged_mla) on CUDA against the fp32
PyTorch reference, with inputs laid out as vLLM's MLA decode hands them over (q_nope a
transposed bmm output, q_pe a slice, the layer's cache a view of a cross-layer allocation):
16 and 128 heads, block sizes 16 and 64, lengths that cross block and window boundaries,
mixed batches, varlen with padding, all inside a captured CUDA graph replayed with new
queries, lengths and block tables. Capture itself fails on any host sync."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from kernels.paged_mla_reference import paged_sink_recent_mla_reference as reference  # noqa: E402
from kernels.triton_paged_mla import launch_config, paged_sink_recent_mla_decode as kernel  # noqa: E402

DEV = torch.device("cuda")
R, DR = 512, 64
SCALE = 1 / math.sqrt(128 + 64)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
LAYERS = 2  # the cache is layer 1 of a [num_blocks, LAYERS, block_size, 576] allocation


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


class Batch:
    """Static tensors of one decode step (what a captured graph reads), refilled in place."""

    def __init__(self, num_reqs, num_tokens, heads, block_size, max_blocks, dtype, g):
        self.g, self.dtype, self.bs = g, dtype, block_size
        self.num_blocks = 1 + num_reqs * max_blocks + 5
        full = torch.randn(self.num_blocks, LAYERS, block_size, R + DR, generator=g, device=DEV).to(dtype)
        self.kv = full[:, 1]                                              # block stride LAYERS * bs * 576
        self.qn_store = torch.empty(heads, num_tokens, R, device=DEV, dtype=dtype)
        self.q_nope = self.qn_store.transpose(0, 1)                       # [T, H, R], head stride T * R
        self.q_full = torch.empty(num_tokens, heads, 128 + DR, device=DEV, dtype=dtype)
        self.q_pe = self.q_full[..., 128:]                                # [T, H, 64] slice of [T, H, 192]
        self.block_table = torch.zeros(num_reqs, max_blocks, dtype=torch.int32, device=DEV)
        self.seq_lens = torch.zeros(num_reqs, dtype=torch.int32, device=DEV)
        self.qsl = torch.zeros(num_reqs + 1, dtype=torch.int32, device=DEV)

    def fill(self, lens, per_req=None):
        """New queries, lengths, a fresh block permutation (block 0 never used: vLLM's null block)."""
        B, max_blocks = self.block_table.shape
        assert len(lens) == B and max(lens) <= max_blocks * self.bs
        self.qn_store.copy_(torch.randn(self.qn_store.shape, generator=self.g, device=DEV))
        self.q_full.copy_(torch.randn(self.q_full.shape, generator=self.g, device=DEV))
        ids = 1 + torch.randperm(self.num_blocks - 1, generator=self.g, device=DEV)[: B * max_blocks]
        self.block_table.copy_(ids.view(B, max_blocks))
        self.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        if per_req is not None:
            self.qsl.copy_(torch.tensor([0] + torch.tensor(per_req).cumsum(0).tolist(), dtype=torch.int32))

    def call(self, sink, recent, varlen=False, **override):
        return kernel(self.q_nope, self.q_pe, self.kv, self.block_table, self.seq_lens, sink, recent, SCALE,
                      query_start_loc=self.qsl if varlen else None, return_lse=True, **override)

    def reference(self, sink, recent, varlen=False):
        return reference(self.q_nope, self.q_pe, self.kv, self.block_table, self.seq_lens, sink, recent, SCALE,
                         query_start_loc=self.qsl if varlen else None)


def _capture(fn):
    """Warm up (compiles) on a side stream, then capture one call into a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def _check(batch, result, sink, recent, varlen=False):
    out, lse = result
    ref, ref_lse = batch.reference(sink, recent, varlen)
    assert _rel(out, ref) < TOL[batch.dtype], _rel(out, ref)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - ref_lse[finite]).abs().max().item() < 2e-3
    empty = ~finite.any(1)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))  # length 0 (vLLM's padded requests)


def _rounds(sink, recent, bs):
    """Three mixed batches (one row per request, same B): lengths at and around every boundary
    (block, sink, sink + recent), long ones, and a 0 (a padded request)."""
    w = sink + recent
    edges = [1, bs - 1, bs, bs + 1, sink - 1, sink, sink + 1, w - 1, w, w + 1, w + bs, 4 * w + 3, 9000, 0]
    again = [w + 1, 0, 5, 2 * bs, w, 9000 - bs, sink + bs + 1, 1, w - 1, 3 * bs - 1, 700, 4097, sink, bs + 7]
    third = [9000, 9000, 8999, w + 2, 2, 0, 0, w, sink, 6 * bs, 17, 1000, 33, 2 * w]
    return [[max(0, x) for x in lens] for lens in (edges, again, third)]


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("sink,recent,block_size", [(128, 384, 16), (128, 384, 64), (16, 48, 16)],
                         ids=["128+384-bs16", "128+384-bs64", "16+48-bs16"])
def test_kernel_in_cuda_graph_matches_reference(heads, block_size, sink, recent):
    g = torch.Generator(device=DEV).manual_seed(heads + block_size + sink)
    rounds = _rounds(sink, recent, block_size)
    max_len = max(max(lens) for lens in rounds)
    batch = Batch(len(rounds[0]), len(rounds[0]), heads, block_size, -(-max_len // block_size) + 1, torch.bfloat16, g)
    batch.fill(rounds[0])
    graph, result = _capture(lambda: batch.call(sink, recent))
    for lens in rounds:
        batch.fill(lens)
        graph.replay()
        torch.cuda.synchronize()
        _check(batch, result, sink, recent)


@pytest.mark.parametrize("heads", [16, 128])
def test_varlen_tokens_and_padding_in_cuda_graph(heads):
    """Several query tokens per request (vLLM's FLASH_ATTN_MLA sends short extends down the
    decode path), requests with none, and padding tokens past query_start_loc[-1]."""
    sink, recent, bs = 16, 48, 16
    g = torch.Generator(device=DEV).manual_seed(7 + heads)
    plans = [([70, 3, 0, 65, 64, 1, 200], [1, 3, 0, 2, 4, 1, 1]),
             ([64, 9, 130, 0, 66, 2, 17], [2, 1, 4, 0, 1, 2, 1]),
             ([1, 1, 1, 300, 0, 0, 80], [1, 1, 1, 5, 0, 0, 3])]
    T = max(sum(p) for _, p in plans) + 2  # room for padding tokens
    batch = Batch(7, T, heads, bs, 300 // bs + 2, torch.bfloat16, g)
    batch.fill(*plans[0])
    graph, result = _capture(lambda: batch.call(sink, recent, varlen=True))
    for lens, per_req in plans:
        batch.fill(lens, per_req)
        graph.replay()
        torch.cuda.synchronize()
        _check(batch, result, sink, recent, varlen=True)


@pytest.mark.parametrize("heads,override", [
    (16, dict(num_splits=1)),                         # direct: no combine kernel
    (16, dict(num_splits=7, block_n=32)),
    (128, dict(num_splits=1)),
    (128, dict(num_splits=3, block_n=16)),
    (128, dict(block_h=16, num_warps=4)),             # per-head-block variant (8 programs per split)
    (20, {}),                                         # heads not a power of two
], ids=lambda v: str(v).replace(" ", ""))
def test_launch_variants(heads, override):
    g = torch.Generator(device=DEV).manual_seed(11)
    lens = [1, 127, 128, 129, 511, 512, 513, 4000, 0]
    batch = Batch(len(lens), len(lens), heads, 64, 4000 // 64 + 2, torch.bfloat16, g)
    batch.fill(lens)
    _check(batch, batch.call(128, 384, **override), 128, 384)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype):
    g = torch.Generator(device=DEV).manual_seed(5)
    lens = [1, 100, 513, 2000, 0]
    batch = Batch(len(lens), len(lens), 16, 16, 2000 // 16 + 2, dtype, g)
    batch.fill(lens)
    _check(batch, batch.call(128, 384), 128, 384)


def test_split_count_is_fixed_by_the_batch_shape():
    """The grid never depends on lengths: same T, H and window, same launch."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for T, H in ((1, 16), (16, 16), (64, 16), (16, 128), (64, 128), (512, 128)):
        cfg = launch_config(T, H, R, torch.bfloat16, 128, 384, sms)
        assert cfg.num_splits * cfg.chunk >= 512 and cfg.chunk % cfg.block_n == 0
        assert cfg.head_blocks * cfg.block_h >= H


def test_fp8_cache_is_refused():
    g = torch.Generator(device=DEV).manual_seed(1)
    batch = Batch(2, 2, 16, 16, 4, torch.bfloat16, g)
    batch.fill([3, 5])
    with pytest.raises(ValueError, match="fp8 caches"):
        kernel(batch.q_nope, batch.q_pe, batch.kv.view(torch.uint8)[..., :576], batch.block_table, batch.seq_lens,
               128, 384, SCALE)
