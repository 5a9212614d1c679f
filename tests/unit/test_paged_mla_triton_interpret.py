"""The paged sink+recent MLA Triton kernels (kernels.triton_paged_mla) run by Triton's CPU
interpreter (TRITON_INTERPRET=1) against the PyTorch reference: head blocks, block sizes, lengths
across block and window boundaries, splits, varlen with padding, lse, a caller's ``out``.

A development aid for the kernel's index logic: runs where triton is importable, in a child
process (the interpreter is chosen when the kernels are defined). fp16/fp32 only: the
interpreter multiplies bf16 tiles as raw integers. The CUDA run is tests/gpu/vllm/."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

from omni_passes.testing.triton_interpret import run_interpreted

_SCRIPT = textwrap.dedent(
    """
    import math, torch
    from kernels.triton_paged_mla import launch_config, paged_sink_recent_mla_decode as kernel
    from kernels.paged_mla_reference import paged_sink_recent_mla_reference as reference

    def paged(lens, bs, R, Dr, dtype, g):
        max_blocks = -(-max(lens + [1]) // bs) + 1
        nb = 1 + len(lens) * max_blocks + 2
        kv = torch.randn(nb, bs, R + Dr, generator=g).to(dtype)
        bt = (1 + torch.randperm(nb - 1, generator=g)[: len(lens) * max_blocks]).view(len(lens), max_blocks)
        return kv, bt.to(torch.int32), torch.tensor(lens, dtype=torch.int32)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    g = torch.Generator().manual_seed(0)
    LENS = [1, 15, 16, 17, 20, 21, 49, 50, 51, 64, 65, 130]  # sink 20 + recent 30 = 50
    cases = [  # H, R, Dr, block_size, dtype, sink, recent, varlen, overrides
        (16, 512, 64, 16, torch.float16, 20, 30, False, dict(block_n=16)),                # DeepSeek dims
        (16, 512, 64, 64, torch.float16, 20, 30, False, dict(block_n=16, num_splits=1)),  # direct
        (20, 64, 16, 64, torch.float16, 20, 30, False, dict(block_n=16, num_splits=3)),  # heads not a power of two
        (96, 64, 16, 16, torch.float16, 20, 30, False, dict(block_n=16, num_splits=2)),   # 64-head blocks, one partial
        (128, 64, 16, 16, torch.float16, 20, 30, False, dict(block_n=32, num_splits=1)),
        (8, 64, 16, 16, torch.float32, 0, 7, False, dict(block_n=16, num_splits=2)),      # fp32 (ieee dots), no sink
        (16, 64, 16, 16, torch.float16, 20, 30, True, dict(block_n=16, num_splits=4)),    # varlen + padding
    ]
    n = 0
    for H, R, Dr, bs, dtype, sink, recent, varlen, ov in cases:
        lens = (LENS if H <= 32 else LENS[::2]) + [0]  # a padded request of length 0; fewer at many heads
        kv, bt, sl = paged(lens, bs, R, Dr, dtype, g)
        qsl = None
        T = len(lens)
        if varlen:  # request 1 brings 3 tokens, request 4 two, the last (length 0) none; 2 padding tokens
            per_req = [1, 3, 1, 1, 2] + [1] * (len(lens) - 6) + [0]
            qsl = torch.tensor([0] + torch.tensor(per_req).cumsum(0).tolist(), dtype=torch.int32)
            T = int(qsl[-1]) + 2
        qn = torch.randn(H, T, R, generator=g).to(dtype).transpose(0, 1)     # vLLM's transposed bmm output
        qp = torch.randn(T, H, R + Dr, generator=g).to(dtype)[..., R:]      # a slice of a wider q
        scale = 1 / math.sqrt(R // 4 + Dr)
        out, lse = kernel(qn, qp, kv, bt, sl, sink, recent, scale, query_start_loc=qsl, return_lse=True, **ov)
        ref, ref_lse = reference(qn, qp, kv, bt, sl, sink, recent, scale, query_start_loc=qsl)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        err = rel(out, ref)
        assert err < tol, (H, R, bs, dtype, varlen, ov, err)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), (H, varlen, ov)
        assert (lse[finite] - ref_lse[finite]).abs().max().item() < 1e-3, (H, varlen, ov)
        empty = ~finite.any(1)
        assert empty.any() and torch.equal(out[empty], torch.zeros_like(out[empty]))  # length 0 / padding: zeros
        n += 1

    # a caller's out (a strided view) is written in place and returned; no lse unless asked
    kv, bt, sl = paged(LENS, 16, 64, 16, torch.float16, g)
    qn = torch.randn(len(LENS), 16, 64, generator=g).half()
    qp = torch.randn(len(LENS), 16, 16, generator=g).half()
    big = torch.full((len(LENS), 16, 128), 7.0, dtype=torch.float16)
    res, none = kernel(qn, qp, kv, bt, sl, 20, 30, 0.2, out=big[..., :64], block_n=16)
    ref, _ = reference(qn, qp, kv, bt, sl, 20, 30, 0.2)
    assert none is None and res.data_ptr() == big.data_ptr() and rel(big[..., :64], ref) < 2e-3
    assert (big[..., 64:] == 7).all()
    n += 1

    # the split count depends on the batch shape and the window only
    a = launch_config(16, 16, 512, torch.bfloat16, 128, 384, 132)
    b = launch_config(64, 128, 512, torch.bfloat16, 128, 384, 132)
    assert (a.block_h, a.head_blocks) == (16, 1) and a.num_splits * a.chunk >= 512
    assert (b.block_h, b.head_blocks, b.num_splits) == (64, 2, 1)
    print("ok", n)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_paged_mla_kernels_in_interpreter_mode():
    assert run_interpreted(_SCRIPT).strip() == "ok 8"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    import torch

    from kernels.triton_paged_mla import paged_sink_recent_mla_decode

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        paged_sink_recent_mla_decode(torch.zeros(1, 16, 512), torch.zeros(1, 16, 64), torch.zeros(3, 16, 576),
                                     torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 4, 8, 0.1)
