"""The Triton sparse-attention kernels on CUDA against the dense reference (run on the H100)."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from kernels import sparse_attention as sa  # noqa: E402
from kernels import triton_sparse_attention as tsa  # noqa: E402

DEV = torch.device("cuda")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _decode_inputs(B, Hq, Hkv, Sk, D, Dv, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g, device=DEV).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g, device=DEV).to(dtype)
    v = torch.randn(B, Hkv, Sk, Dv, generator=g, device=DEV).to(dtype)
    # Rows at different positions: the full cache, short prefixes (< sink + recent), the middle.
    pos = torch.randint(0, Sk, (B, 1), generator=g, device=DEV)
    pos[0, 0] = Sk - 1
    if B > 1:
        pos[1, 0] = min(5, Sk - 1)
    return q, k, v, pos


# (B, Hq, Hkv, Sk, D, Dv, sink, recent)
DECODE = [
    (16, 16, 16, 4096, 128, 128, 128, 384),   # MHA 128, the benchmark shape
    (16, 16, 16, 2048, 64, 64, 128, 384),     # MHA 64
    (4, 32, 8, 3000, 128, 128, 64, 200),      # GQA 4
    (3, 16, 2, 1000, 64, 64, 16, 48),         # GQA 8
    (2, 8, 1, 777, 128, 128, 0, 1),           # MQA, sink 0, recent 1
    (5, 4, 4, 100, 128, 128, 128, 384),       # cache shorter than sink + recent
    (2, 8, 8, 5000, 192, 128, 32, 64),        # DeepSeek non-absorbed head dims (extra key part)
    (3, 4, 4, 900, 128, 128, 300, 0),         # sink only
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", DECODE)
def test_decode_kernel_matches_reference(shape, dtype):
    B, Hq, Hkv, Sk, D, Dv, sink, recent = shape
    q, k, v, pos = _decode_inputs(B, Hq, Hkv, Sk, D, Dv, dtype, seed=hash(shape) % 1000)
    assert tsa.supports(q, k, v)
    scale = 1 / math.sqrt(D)
    out = torch.ops.omni.sparse_attention(q, k, v, pos, sink, recent, scale)
    ref = sa.sparse_attention_reference(q, k, v, pos, sink, recent, scale)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < TOL[dtype]


# Launch variants the benchmark's tuning sweep tries: every one must be exact, not just the default.
VARIANTS = [dict(num_splits=n) for n in (1, 2, 3, 7, 16)] + [
    dict(use_dot=False), dict(use_dot=False, num_splits=4), dict(block_n=32), dict(block_n=128),
    dict(block_n=16, num_splits=16), dict(num_stages=3), dict(num_warps=8), dict(block_g=32),
]


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("override", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_decode_launch_variants(override, group):
    q, k, v, pos = _decode_inputs(4, 8, 8 // group, 2000, 128, 128, torch.bfloat16, seed=len(override))
    out = tsa.sparse_decode(q, k, v, pos, 128, 384, 0.09, **override)
    ref = sa.sparse_attention_reference(q, k, v, pos, 128, 384, 0.09)
    assert _rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, override", [
    (16, None), (128, None), (128, dict(block_g=32)), (20, dict(block_g=16)),
    (16, dict(block_n=32, num_splits=16)), (128, dict(block_n=32, num_splits=2)),
    (16, dict(block_n=64, num_splits=4)), (128, dict(block_n=64, num_splits=1)),
])
def test_mla_decode_kernel_matches_reference(dtype, heads, override):
    B, Sk, Dk, Dv = 8, 3000, 576, 512
    g = torch.Generator(device=DEV).manual_seed(heads)
    q = torch.randn(B, heads, 1, Dk, generator=g, device=DEV).to(dtype)
    kv = torch.randn(B, Sk, Dk, generator=g, device=DEV).to(dtype)
    pos = torch.randint(0, Sk, (B, 1), generator=g, device=DEV)
    pos[0, 0], pos[1, 0] = Sk - 1, 3
    scale = 1 / math.sqrt(192)
    if override is None:
        out = torch.ops.omni.sparse_attention_mla_decode(q, kv, pos, 128, 384, scale, Dv)
    else:
        k = kv.unsqueeze(1)
        out = tsa.sparse_decode(q, k, k[..., :Dv], pos, 128, 384, scale, v_from_k=True, **override)
    k = kv.unsqueeze(1)
    ref = sa.sparse_attention_reference(q, k, k[..., :Dv], pos, 128, 384, scale)
    assert _rel_err(out, ref) < TOL[dtype]


# (B, Hq, Hkv, Sq, Sk, D, Dv, sink, recent)
PREFILL = [
    (2, 8, 8, 1024, 1024, 128, 128, 128, 384),
    (1, 16, 4, 3000, 3000, 64, 64, 64, 200),
    (2, 4, 4, 700, 1500, 128, 128, 128, 384),   # chunked prefill: queries at the end of the rows
    (1, 4, 2, 200, 200, 192, 128, 16, 32),      # non-absorbed DeepSeek dims
    (2, 4, 4, 3, 500, 128, 128, 16, 64),        # a few queries (speculative decode)
    (1, 4, 4, 300, 300, 64, 64, 0, 1),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", PREFILL)
def test_prefill_kernel_matches_reference(shape, dtype):
    B, Hq, Hkv, Sq, Sk, D, Dv, sink, recent = shape
    g = torch.Generator(device=DEV).manual_seed(Sq)
    q = torch.randn(B, Hq, Sq, D, generator=g, device=DEV).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g, device=DEV).to(dtype)
    v = torch.randn(B, Hkv, Sk, Dv, generator=g, device=DEV).to(dtype)
    lengths = torch.randint(Sq, Sk + 1, (B,), generator=g, device=DEV)
    lengths[0] = Sk
    pos = lengths[:, None] - Sq + torch.arange(Sq, device=DEV)[None]
    scale = 1 / math.sqrt(D)
    out = torch.ops.omni.sparse_attention(q, k, v, pos, sink, recent, scale)
    ref = sa.sparse_attention_reference(q, k, v, pos, sink, recent, scale)
    assert _rel_err(out, ref) < TOL[dtype]


def test_unsupported_shapes_fall_back_to_torch_path():
    q, k, v, pos = _decode_inputs(2, 4, 4, 300, 96, 96, torch.bfloat16, seed=3)  # 96 not a power of 2
    assert not tsa.supports(q, k, v)
    out = torch.ops.omni.sparse_attention(q, k, v, pos, 16, 32, 0.1)
    assert _rel_err(out, sa.sparse_attention_reference(q, k, v, pos, 16, 32, 0.1)) < TOL[torch.bfloat16]
    # A cache whose head dim is not contiguous (a transposed view) also takes the torch path.
    q, _, v, pos = _decode_inputs(2, 4, 4, 300, 64, 64, torch.bfloat16, seed=4)
    k = torch.randn(2, 4, 64, 300, device=DEV, dtype=torch.bfloat16).transpose(2, 3)
    assert not tsa.supports(q, k, v)
    out = torch.ops.omni.sparse_attention(q, k, v, pos, 16, 32, 0.1)
    assert _rel_err(out, sa.sparse_attention_reference(q, k, v, pos, 16, 32, 0.1)) < TOL[torch.bfloat16]


def test_compiled_decode_in_cuda_graph():
    """torch.compile(fullgraph) + CUDA graph replay: positions change between replays in place."""
    q, k, v, pos = _decode_inputs(4, 16, 4, 2048, 128, 128, torch.bfloat16, seed=7)

    def step(q, k, v, pos):
        return torch.ops.omni.sparse_attention(q, k, v, pos, 128, 384, 0.088) * 2.0

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for p in (2047, 900, 10):
        pos.fill_(p)
        pos[0, 0] = 2047 - p
        out = compiled(q, k, v, pos).clone()
        ref = 2.0 * sa.sparse_attention_reference(q, k, v, pos, 128, 384, 0.088)
        assert _rel_err(out, ref) < TOL[torch.bfloat16]
