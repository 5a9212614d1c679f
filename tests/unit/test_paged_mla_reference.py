"""The paged sink+recent MLA reference (kernels.paged_mla_reference) on CPU: its window against
a dense masked attention over each request's whole paged history, paging invariance, varlen and
padding tokens, and the argument checks the Triton launcher shares."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.paged_mla_reference import (paged_sink_recent_mla_reference, sink_recent_positions, token_lengths,
                                         validate_paged_mla_args)


def _paged(lens, block_size, R, Dr, dtype=torch.float32, seed=0, spare_blocks=3):
    """A pool with each request's blocks scattered (random permutation), block 0 left unused
    as vLLM's null block; returns (kv_cache, block_table int32, seq_lens int32)."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, -(-max(lens) // block_size)) + 1  # one spare column, as vLLM's tables have
    num_blocks = 1 + len(lens) * max_blocks + spare_blocks
    kv = torch.randn(num_blocks, block_size, R + Dr, generator=g).to(dtype)
    ids = 1 + torch.randperm(num_blocks - 1, generator=g)[: len(lens) * max_blocks]
    return kv, ids.view(len(lens), max_blocks).to(torch.int32), torch.tensor(lens, dtype=torch.int32)


def _query(T, H, R, Dr, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, R, generator=g).to(dtype), torch.randn(T, H, Dr, generator=g).to(dtype)


def _dense_masked(q_nope, q_pe, kv, block_table, token_req_len, sink, recent, scale):
    """Independent check: each request's history [0, L) read slot by slot through the block
    table, every position scored, then a boolean mask (p < sink or p >= L - recent) applied."""
    T, H, R = q_nope.shape
    bs = kv.shape[1]
    out = torch.zeros(T, H, R)
    lse = torch.full((T, H), float("-inf"))
    for tok, (req, L) in enumerate(token_req_len):
        if L == 0:
            continue
        hist = torch.stack([kv[int(block_table[req, p // bs]), p % bs] for p in range(L)]).double()
        q = torch.cat([q_nope[tok], q_pe[tok]], -1).double()
        scores = scale * q @ hist.T
        p = torch.arange(L)
        scores = scores.masked_fill(~((p < sink) | (p >= L - recent)), float("-inf"))
        lse[tok] = torch.logsumexp(scores, -1).float()
        out[tok] = (torch.softmax(scores, -1) @ hist[:, :R]).float()
    return out, lse


@pytest.mark.parametrize("length,sink,recent,expected", [
    (0, 4, 8, []),
    (3, 4, 8, [0, 1, 2]),                                  # shorter than the sink
    (4, 4, 8, [0, 1, 2, 3]),
    (12, 4, 8, list(range(12))),                           # exactly sink + recent: dense
    (13, 4, 8, [0, 1, 2, 3] + list(range(5, 13))),         # one position dropped
    (30, 4, 8, [0, 1, 2, 3] + list(range(22, 30))),
    (30, 0, 8, list(range(22, 30))),                       # no sink: a sliding window
    (30, 4, 1, [0, 1, 2, 3, 29]),
])
def test_sink_recent_positions(length, sink, recent, expected):
    assert sink_recent_positions(length, sink, recent).tolist() == expected


def test_token_lengths_varlen_with_padding():
    # requests: 1 token (L 7), 3 tokens (L 10: positions 7, 8, 9), 0 tokens (padding request), 2 tokens (L 2)
    seq_lens = torch.tensor([7, 10, 0, 2], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 4, 4, 6], dtype=torch.int32)
    assert token_lengths(seq_lens, 8, qsl) == [(0, 7), (1, 8), (1, 9), (1, 10), (3, 1), (3, 2), (-1, 0), (-1, 0)]
    assert token_lengths(seq_lens, 4) == [(0, 7), (1, 10), (2, 0), (3, 2)]


# lengths cross block boundaries (bs 16/64), the sink/recent seam and the dense limit (sink + recent = 52)
LENS = [1, 15, 16, 17, 20, 21, 51, 52, 53, 63, 64, 65, 130, 200]


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("sink,recent", [(20, 32), (0, 40), (16, 1)])
def test_reference_matches_dense_masked_attention(block_size, sink, recent):
    R, Dr, H = 32, 16, 4
    kv, bt, sl = _paged(LENS, block_size, R, Dr)
    qn, qp = _query(len(LENS), H, R, Dr)
    scale = 1 / math.sqrt(48)
    out, lse = paged_sink_recent_mla_reference(qn, qp, kv, bt, sl, sink, recent, scale)
    ref_out, ref_lse = _dense_masked(qn, qp, kv, bt, list(enumerate(LENS)), sink, recent, scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_reference_varlen_tokens_and_padding():
    R, Dr, H, sink, recent = 32, 16, 3, 8, 12
    lens = [30, 5, 0, 41]
    qsl = torch.tensor([0, 1, 4, 4, 6], dtype=torch.int32)  # 1, 3, 0, 2 query tokens; tokens 6, 7 padding
    kv, bt, sl = _paged(lens, 16, R, Dr)
    qn, qp = _query(8, H, R, Dr)
    out, lse = paged_sink_recent_mla_reference(qn, qp, kv, bt, sl, sink, recent, 0.2, query_start_loc=qsl)
    expect = [(0, 30), (1, 3), (1, 4), (1, 5), (3, 40), (3, 41), (-1, 0), (-1, 0)]
    ref_out, ref_lse = _dense_masked(qn, qp, kv, bt, expect, sink, recent, 0.2)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[6:], torch.zeros(2, H, R)) and torch.isinf(lse[6:]).all()


def test_paging_does_not_change_the_result():
    """The same histories laid out in 16- and 64-slot blocks under different permutations give
    bit-identical outputs: only the positions matter, not where the blocks sit."""
    R, Dr, H, lens = 64, 16, 2, [70, 3, 150]
    kv16, bt16, sl = _paged(lens, 16, R, Dr, seed=3)
    # copy every position into a 64-slot layout with another permutation
    kv64, bt64, _ = _paged(lens, 64, R, Dr, seed=4)
    for b, L in enumerate(lens):
        for p in range(L):
            kv64[int(bt64[b, p // 64]), p % 64] = kv16[int(bt16[b, p // 16]), p % 16]
    qn, qp = _query(3, H, R, Dr)
    a = paged_sink_recent_mla_reference(qn, qp, kv16, bt16, sl, 32, 48, 0.125)
    b = paged_sink_recent_mla_reference(qn, qp, kv64, bt64, sl, 32, 48, 0.125)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_reference_keeps_the_query_dtype_and_deepseek_dims():
    R, Dr, H = 512, 64, 16
    kv, bt, sl = _paged([700, 9], 64, R, Dr, dtype=torch.bfloat16)
    qn, qp = _query(2, H, R, Dr, dtype=torch.bfloat16)
    out, lse = paged_sink_recent_mla_reference(qn, qp, kv, bt, sl, 128, 384, 1 / math.sqrt(192))
    assert out.shape == (2, H, R) and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref, ref_lse = _dense_masked(qn.float(), qp.float(), kv.float(), bt, [(0, 700), (1, 9)], 128, 384,
                                 1 / math.sqrt(192))
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)


def _good(**change):
    kv, bt, sl = _paged([5, 9], 16, 32, 16)
    qn, qp = _query(2, 4, 32, 16)
    args = dict(q_nope=qn, q_pe=qp, kv_cache=kv, block_table=bt, seq_lens=sl, sink=4, recent=8, query_start_loc=None)
    args.update(change)
    return args


@pytest.mark.parametrize("change,message", [
    (dict(kv_cache=torch.zeros(5, 16, 48, dtype=torch.uint8)), "fp8 caches"),
    (dict(kv_cache=torch.zeros(5, 16, 48, dtype=torch.float8_e4m3fn)), "fp8 caches"),
    (dict(kv_cache=torch.zeros(5, 16, 48, dtype=torch.float16)), "must share a dtype"),
    (dict(kv_cache=torch.zeros(5, 16, 40)), "rows hold 40 values"),
    (dict(kv_cache=torch.zeros(5, 16, 96)[..., ::2]), "unit stride"),
    (dict(q_pe=torch.zeros(2, 3, 16)), "q_pe's [T, H]"),
    (dict(q_nope=torch.zeros(2, 4, 32, 1)), "q_nope must be 3-D"),
    (dict(block_table=torch.zeros(2, 3)), "block_table must be 2-D"),
    (dict(seq_lens=torch.zeros(3, dtype=torch.int32)), "seq_lens must be 1-D [B] = [2]"),
    (dict(seq_lens=torch.zeros(2)), "int32/int64"),
    (dict(q_nope=torch.zeros(3, 4, 32), q_pe=torch.zeros(3, 4, 16)), "one query token per request"),
    (dict(query_start_loc=torch.zeros(2, dtype=torch.int32)), "query_start_loc must be 1-D [B + 1] = [3]"),
    (dict(sink=-1), "sink must be an int >= 0"),
    (dict(recent=0), "recent must be an int >= 1"),
    (dict(recent=2.5), "recent must be an int >= 1"),
])
def test_bad_arguments_name_the_problem(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        validate_paged_mla_args(**_good(**change))


def test_good_arguments_pass_and_varlen_tokens_may_outnumber_requests():
    validate_paged_mla_args(**_good())
    validate_paged_mla_args(**_good(q_nope=torch.zeros(5, 4, 32), q_pe=torch.zeros(5, 4, 16),
                                    query_start_loc=torch.tensor([0, 2, 5], dtype=torch.int32)))
