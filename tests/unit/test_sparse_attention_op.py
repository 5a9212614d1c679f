"""omni::sparse_attention and omni::sparse_attention_mla_decode on CPU: semantics, the generic
paths against the dense reference, validation, fake kernels and torch.compile."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kernels import sparse_attention as sa

ROOT = Path(__file__).resolve().parents[2]


def _inputs(B, Hq, Hkv, Sq, Sk, D, Dv, *, dtype=torch.float32, seed=0, positions="prefill"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, Dv, generator=g).to(dtype)
    if positions == "prefill":
        # Each row's queries are its last Sq positions of a sequence of a different length.
        lengths = torch.randint(Sq, Sk + 1, (B,), generator=g)
        lengths[0] = Sk
        q_pos = lengths[:, None] - Sq + torch.arange(Sq)[None, :]
    else:  # any position per query, including the unfilled end of the cache
        q_pos = torch.randint(0, Sk, (B, Sq), generator=g)
        q_pos[0, 0] = Sk - 1
    return q, k, v, q_pos


def _brute_force(q, k, v, q_pos, sink, recent, scale):
    """One query at a time with Python loops over keys: checks the reference itself."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.zeros(B, Hq, Sq, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for s in range(Sq):
                p = int(q_pos[b, s])
                keys = [j for j in range(Sk) if j <= p and (j < sink or j > p - recent)]
                if not keys:
                    continue
                logits = torch.stack([(q[b, h, s].double() @ k[b, kh, j].double()) * scale for j in keys])
                w = torch.softmax(logits, 0)
                out[b, h, s] = sum(w[i] * v[b, kh, j].double() for i, j in enumerate(keys))
    return out


def _close(actual, expected, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def test_reference_matches_brute_force():
    q, k, v, q_pos = _inputs(2, 4, 2, 5, 23, 8, 6, positions="any")
    for sink, recent in [(3, 4), (0, 1), (5, 0), (30, 30)]:
        ref = sa.sparse_attention_reference(q, k, v, q_pos, sink, recent, 0.4)
        torch.testing.assert_close(ref.double(), _brute_force(q, k, v, q_pos, sink, recent, 0.4),
                                   rtol=1e-5, atol=1e-5)


def test_mask_semantics_by_hand():
    mask = sa.sparse_attention_mask(torch.tensor([[0, 5, 9]]), 10, sink=2, recent=3)[0]
    assert mask[0].nonzero().flatten().tolist() == [0]
    assert mask[1].nonzero().flatten().tolist() == [0, 1, 3, 4, 5]
    assert mask[2].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]


# (B, Hq, Hkv, Sq, Sk, D, Dv, sink, recent)
PREFILL_SHAPES = [
    (2, 4, 4, 64, 64, 16, 16, 4, 8),      # MHA, sequences longer than sink + recent
    (3, 8, 2, 40, 40, 32, 32, 8, 16),     # GQA
    (2, 6, 1, 33, 50, 16, 8, 3, 5),       # MQA, Dv != D, queries at the end of longer rows
    (2, 4, 2, 12, 12, 16, 16, 8, 16),     # shorter than sink + recent: dense causal
    (1, 2, 2, 300, 300, 8, 8, 0, 1),      # sink 0, recent 1: each query sees itself only
    (1, 2, 2, 300, 300, 8, 8, 0, 37),     # pure sliding window
    (2, 2, 1, 270, 300, 8, 8, 17, 0),     # sink only
    (1, 4, 4, 520, 520, 8, 8, 16, 64),    # several prefill chunks
]


@pytest.mark.parametrize("shape", PREFILL_SHAPES)
@pytest.mark.parametrize("path", ["op", "gather", "chunked"])
def test_prefill_matches_reference(shape, path):
    B, Hq, Hkv, Sq, Sk, D, Dv, sink, recent = shape
    q, k, v, q_pos = _inputs(B, Hq, Hkv, Sq, Sk, D, Dv)
    scale = 1 / math.sqrt(D)
    ref = sa.sparse_attention_reference(q, k, v, q_pos, sink, recent, scale)
    if path == "op":
        out = torch.ops.omni.sparse_attention(q, k, v, q_pos, sink, recent, scale)
    else:
        out = sa.sparse_attention_torch(q, k, v, q_pos, sink, recent, scale, path=path)
    assert out.shape == (B, Hq, Sq, Dv) and out.dtype == q.dtype
    _close(out, ref, q.dtype)


DECODE_SHAPES = [
    (4, 4, 4, 1, 700, 64, 64, 16, 48),     # MHA 64
    (3, 8, 2, 1, 600, 128, 128, 32, 96),   # GQA 128
    (2, 16, 1, 1, 300, 576, 512, 8, 40),   # MLA-shaped MQA
    (3, 4, 4, 1, 20, 16, 16, 16, 32),      # cache shorter than sink + recent
    (2, 4, 2, 1, 100, 16, 16, 0, 1),
    (2, 4, 2, 4, 100, 16, 16, 5, 9),       # a few queries (speculative decode)
]


@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_reference(shape, dtype):
    B, Hq, Hkv, Sq, Sk, D, Dv, sink, recent = shape
    q, k, v, q_pos = _inputs(B, Hq, Hkv, Sq, Sk, D, Dv, dtype=dtype, positions="any")
    scale = 1 / math.sqrt(D)
    out = torch.ops.omni.sparse_attention(q, k, v, q_pos, sink, recent, scale)
    _close(out, sa.sparse_attention_reference(q, k, v, q_pos, sink, recent, scale), dtype)


def test_short_sequences_equal_dense_causal_attention():
    """sink + recent >= sequence length: exactly causal attention (what the dense model does)."""
    q, k, v, _ = _inputs(2, 4, 2, 24, 24, 16, 16)
    q_pos = torch.arange(24).expand(2, 24)
    out = torch.ops.omni.sparse_attention(q, k, v, q_pos, 8, 16, 0.25)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.25)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_decode_reads_only_sink_and_recent():
    """Keys outside [0, sink) ∪ (p - recent, p] do not matter: poison them with NaN."""
    q, k, v, _ = _inputs(2, 4, 4, 1, 4096, 32, 32)
    q_pos = torch.tensor([[4000], [300]])
    k2, v2 = k.clone(), v.clone()
    for b, p in enumerate([4000, 300]):
        keep = sa.sparse_attention_mask(torch.tensor([[p]]), 4096, 16, 64)[0, 0]
        k2[b, :, ~keep] = float("nan")
        v2[b, :, ~keep] = float("nan")
    out = torch.ops.omni.sparse_attention(q, k2, v2, q_pos, 16, 64, 0.2)
    torch.testing.assert_close(out, sa.sparse_attention_reference(q, k, v, q_pos, 16, 64, 0.2),
                               rtol=1e-5, atol=1e-5)


def test_rows_without_visible_keys_are_zero():
    q, k, v, _ = _inputs(2, 2, 2, 1, 10, 8, 8)
    q_pos = torch.tensor([[-1], [40]])  # padding row; position far past the cache
    out = torch.ops.omni.sparse_attention(q, k, v, q_pos, 0, 4, 0.3)
    assert torch.equal(out, torch.zeros_like(out))
    ref = sa.sparse_attention_reference(q, k, v, q_pos, 0, 4, 0.3)
    assert torch.equal(ref, torch.zeros_like(ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sq", [1, 3])
def test_mla_decode_matches_reference(dtype, sq):
    B, H, Sk, Dk, Dv = 3, 16, 400, 576, 512
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, sq, Dk, generator=g).to(dtype)
    kv = torch.randn(B, Sk, Dk, generator=g).to(dtype)
    q_pos = torch.tensor([[399], [130], [7]]) - torch.arange(sq - 1, -1, -1)
    scale = 1 / math.sqrt(192)
    out = torch.ops.omni.sparse_attention_mla_decode(q, kv, q_pos, 16, 100, scale, Dv)
    assert out.shape == (B, H, sq, Dv)
    k = kv.unsqueeze(1)
    ref = sa.sparse_attention_reference(q, k, k[..., :Dv], q_pos, 16, 100, scale)
    _close(out, ref, dtype)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(sink=-1), "sink must be an int >= 0"),
        (dict(recent=-2), "recent must be an int >= 0"),
        (dict(sink=0, recent=0), "sink \\+ recent must be >= 1"),
        (dict(q=torch.randn(2, 3, 4, 8)), "query heads 3 must be a multiple of kv heads 2"),
        (dict(k=torch.randn(2, 2, 10, 16)), "q head dim 8 != k head dim 16"),
        (dict(v=torch.randn(2, 2, 11, 8)), "v shape .* does not match k"),
        (dict(k=torch.randn(3, 2, 10, 8)), "batch sizes differ"),
        (dict(q_pos=torch.zeros(2, 5, dtype=torch.int64)), "q_pos must have shape \\[B, Sq\\] = \\[2, 4\\]"),
        (dict(q_pos=torch.zeros(2, 4)), "q_pos must be int64 or int32"),
        (dict(q=torch.randn(2, 4, 8)), "q must be 4-D"),
        (dict(v=torch.randn(2, 2, 10, 8, dtype=torch.float64)), "must share a dtype"),
    ],
)
def test_bad_arguments_are_rejected(change, message):
    args = dict(q=torch.randn(2, 4, 4, 8), k=torch.randn(2, 2, 10, 8), v=torch.randn(2, 2, 10, 8),
                q_pos=torch.zeros(2, 4, dtype=torch.int64), sink=2, recent=3)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        torch.ops.omni.sparse_attention(args["q"], args["k"], args["v"], args["q_pos"],
                                        args["sink"], args["recent"], 0.1)


def test_bad_mla_arguments_are_rejected():
    q, kv, pos = torch.randn(2, 4, 1, 24), torch.randn(2, 10, 24), torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="kv must be 3-D"):
        torch.ops.omni.sparse_attention_mla_decode(q, kv.unsqueeze(1), pos, 1, 2, 0.1, 16)
    with pytest.raises(ValueError, match="v_head_dim must be in \\[1, 24\\]"):
        torch.ops.omni.sparse_attention_mla_decode(q, kv, pos, 1, 2, 0.1, 30)
    with pytest.raises(ValueError, match="recent must be"):
        torch.ops.omni.sparse_attention_mla_decode(q, kv, pos, 1, -2, 0.1, 16)


def test_opcheck_schema_and_fake_kernels():
    q, k, v, q_pos = _inputs(2, 4, 2, 3, 20, 8, 8)
    torch.library.opcheck(torch.ops.omni.sparse_attention.default, (q, k, v, q_pos, 2, 5, 0.3))
    kv = torch.randn(2, 20, 24)
    torch.library.opcheck(torch.ops.omni.sparse_attention_mla_decode.default,
                          (torch.randn(2, 4, 1, 24), kv, q_pos[:, :1], 2, 5, 0.3, 16))


def test_torch_compile_fullgraph_decode_and_prefill():
    def block(q, k, v, q_pos):
        # Some real work around the op, as in a layer, so the graph is not just the op.
        out = torch.ops.omni.sparse_attention(q * 1.5, k, v, q_pos, 4, 8, 0.2)
        return torch.nn.functional.silu(out).sum(dim=1)

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    for Sq, Sk in [(1, 64), (16, 16)]:
        q, k, v, q_pos = _inputs(2, 4, 2, Sq, Sk, 16, 16, positions="any")
        torch.testing.assert_close(compiled(q, k, v, q_pos), block(q, k, v, q_pos), rtol=1e-5, atol=1e-5)

    mla = torch.compile(lambda q, kv, p: torch.ops.omni.sparse_attention_mla_decode(q, kv, p, 4, 8, 0.2, 16) + 1,
                        fullgraph=True)
    q, kv, p = torch.randn(2, 4, 1, 24), torch.randn(2, 30, 24), torch.tensor([[29], [3]])
    torch.testing.assert_close(mla(q, kv, p), torch.ops.omni.sparse_attention_mla_decode(q, kv, p, 4, 8, 0.2, 16) + 1)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(3, 8, 5, 192), torch.empty(3, 2, 70, 192), torch.empty(3, 2, 70, 128)
        out = torch.ops.omni.sparse_attention(q, k, v, torch.empty(3, 5, dtype=torch.int64), 4, 8, 0.1)
        assert out.shape == (3, 8, 5, 128)
        mla = torch.ops.omni.sparse_attention_mla_decode(
            torch.empty(3, 16, 1, 576, dtype=torch.bfloat16), torch.empty(3, 70, 576, dtype=torch.bfloat16),
            torch.empty(3, 1, dtype=torch.int64), 4, 8, 0.1, 512)
        assert mla.shape == (3, 16, 1, 512) and mla.dtype == torch.bfloat16


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import math, torch
    from kernels import triton_sparse_attention as tsa
    from kernels.sparse_attention import sparse_attention_reference as reference
    torch.manual_seed(0)
    cases = [  # B, Hq, Hkv, Sq, Sk, D, Dv, sink, recent, v_from_k, overrides
        (3, 4, 4, 1, 300, 16, 16, 40, 100, False, dict(block_n=16, num_splits=3)),   # MHA, split
        (3, 4, 4, 1, 300, 16, 16, 40, 100, False, dict(block_n=16, use_dot=False)),  # CUDA-core path
        (2, 4, 4, 1, 300, 16, 16, 40, 100, False, dict(block_n=16, num_splits=1)),   # MHA, direct
        (2, 8, 2, 1, 200, 32, 32, 8, 24, False, dict(block_n=16, num_splits=2)),     # GQA, tl.dot
        (3, 32, 1, 1, 300, 48, 32, 40, 100, True, dict(block_n=16, num_splits=5)),   # MLA-like
        (2, 4, 2, 1, 10, 16, 16, 16, 32, False, {}),                                 # short cache
        (2, 2, 2, 1, 200, 16, 16, 0, 1, False, {}),
        (2, 4, 2, 40, 120, 16, 16, 8, 24, False, dict(block_m=16, block_n=16)),      # prefill
        (1, 2, 1, 33, 70, 32, 16, 3, 9, False, dict(block_m=16, block_n=16)),        # prefill D != Dv
    ]
    for B, Hq, Hkv, Sq, Sk, D, Dv, sink, recent, v_from_k, ov in cases:
        q = torch.randn(B, Hq, Sq, D)
        if v_from_k:
            k = torch.randn(B, Sk, D).unsqueeze(1); v = k[..., :Dv]
        else:
            k = torch.randn(B, Hkv, Sk, D); v = torch.randn(B, Hkv, Sk, Dv)
        pos = torch.randint(-1, Sk, (B, Sq)) if Sq == 1 else torch.arange(Sq) + torch.randint(0, Sk - Sq + 1, (B, 1))
        out = tsa.sparse_attention_triton(q, k, v, pos, sink, recent, 1 / math.sqrt(D), v_from_k=v_from_k, **ov)
        ref = reference(q, k, v, pos, sink, recent, 1 / math.sqrt(D))
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (B, Hq, Hkv, Sq, Sk, D, Dv, sink, recent, err)
    print("ok", len(cases))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_in_interpreter_mode():
    """The CUDA kernels' logic, run by Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok 9"


# --------------------------------------------------------------------------- GE converter graph
def _torch_ge():
    """Torch emulation of the Ascend IR ops the converter emits (their documented semantics),
    to check the converter's graph arithmetic on CPU. torchair itself is not installable here."""

    def op(op_type, inputs, attrs):
        x = inputs.get("x")
        binary = {"Mul": torch.mul, "Sub": torch.sub, "Less": torch.lt, "LessEqual": torch.le,
                  "Greater": torch.gt, "LogicalAnd": torch.logical_and, "LogicalOr": torch.logical_or}
        if op_type in binary:
            return binary[op_type](inputs["x1"], inputs["x2"])
        if op_type == "Cast":
            return x.to(attrs["dst_type"])
        if op_type == "Shape":
            return torch.tensor(x.shape, dtype=attrs["dtype"])
        if op_type == "GatherV2":
            return torch.index_select(x, int(inputs["axis"]), inputs["indices"].reshape(-1)).reshape(
                inputs["indices"].shape)
        if op_type == "ConcatV2":
            return torch.cat([t.reshape(-1) for t in x], dim=int(inputs["concat_dim"]))
        if op_type == "Reshape":
            return x.reshape(inputs["shape"].tolist())
        if op_type == "ExpandDims":
            return x.unsqueeze(int(inputs["axis"]))
        if op_type == "Range":
            return torch.arange(int(inputs["start"]), int(inputs["limit"]), int(inputs["delta"]))
        if op_type == "SelectV2":
            return torch.where(inputs["condition"], inputs["then"], inputs["else"])
        if op_type == "SoftmaxV2":
            return torch.softmax(x, dim=attrs["axes"][0])
        if op_type == "BatchMatMulV2":
            a, b = inputs["x1"], inputs["x2"]
            return torch.matmul(a.transpose(-1, -2) if attrs["adj_x1"] else a,
                                b.transpose(-1, -2) if attrs["adj_x2"] else b)
        if op_type == "Slice":
            sizes = [s if s >= 0 else n - o for s, n, o in zip(inputs["size"].tolist(), x.shape, inputs["offsets"].tolist())]
            return x[tuple(slice(o, o + s) for o, s in zip(inputs["offsets"].tolist(), sizes))]
        raise NotImplementedError(op_type)

    def const(value, dtype):
        return torch.tensor(value, dtype=dtype)

    return op, const


@pytest.mark.parametrize("shape", [(2, 8, 2, 5, 40, 16, 12, 3, 6), (3, 4, 4, 1, 30, 8, 8, 0, 1),
                                   (2, 6, 1, 1, 25, 8, 8, 40, 40)])
def test_ge_converter_graph_matches_reference(shape):
    from kernels import torchair_converters_attn as conv

    B, Hq, Hkv, Sq, Sk, D, Dv, sink, recent = shape
    q, k, v, q_pos = _inputs(B, Hq, Hkv, Sq, Sk, D, Dv, positions="any")
    q_pos[-1, 0] = -1  # a row that sees nothing: zeros
    op, const = _torch_ge()
    out = conv.build_sparse_attention(op, const, q, k, v, q_pos, sink, recent, 0.3, Hq, torch.float32)
    torch.testing.assert_close(out, sa.sparse_attention_reference(q, k, v, q_pos, sink, recent, 0.3),
                               rtol=1e-5, atol=1e-5)
    kv = torch.randn(B, Sk, 24)
    qm = torch.randn(B, Hq, Sq, 24)
    out = conv.build_mla_decode(op, const, qm, kv, q_pos, sink, recent, 0.3, 16, Hq, torch.float32)
    torch.testing.assert_close(out, torch.ops.omni.sparse_attention_mla_decode(qm, kv, q_pos, sink, recent, 0.3, 16),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("torchair") is not None, reason="torchair installed")
def test_ge_converter_register_without_torchair_is_a_no_op():
    from kernels import torchair_converters_attn as conv

    assert conv.register() is False


def test_bench_attn_runs_on_cpu(capsys):
    """`omni-passes bench attn --device cpu --json`: one JSON document, every method checked."""
    import json

    from omni_passes.cli import main

    rc = main(["bench", "attn", "--device", "cpu", "--contexts", "200", "--batch", "2", "--heads", "4",
               "--kv-heads", "2", "--head-dim", "16", "--mla-heads", "4", "--sink", "8", "--recent", "24",
               "--prefill-lengths", "64", "--iters", "3", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    decode = [r for r in doc["results"] if r.get("phase") != "prefill"]
    assert {(r["case"], r["method"]) for r in decode} == {
        (c, m) for c in ("gqa", "mla") for m in ("ours", "sdpa_dense", "flex", "sdpa_gathered")}
    for row in doc["results"]:
        assert row.get("error") is None and row["us"] > 0, row
        if row["method"] != "sdpa_dense" and row["method"] != "sdpa_causal_dense":
            assert row["rel_err"] < 1e-5, row  # every sparse method computes the same function
    assert any(r["method"] == "ours" and r.get("phase") == "prefill" for r in doc["results"])
