"""omni::latent_attention on CPU: the torch path against the reference, the reference against
attention over explicitly expanded keys (the identity the pass relies on), the op under
torch.compile, and argument errors."""

import math
import re

import pytest
import torch

from kernels import latent_attention as la
from kernels.sparse_attention import sparse_attention_reference


def _inputs(B, H, Sq, Sk, R, Dr, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, R + Dr, generator=g).to(dtype)
    kv = torch.randn(B, Sk, R + Dr + 8, generator=g).to(dtype)  # strided views of a wider cache
    pos = torch.stack([torch.randint(0, Sk, (Sq,), generator=g).sort().values for _ in range(B)])
    pos[0, -1] = Sk - 1
    return q, kv[..., :R], kv[..., R:R + Dr], pos


@pytest.mark.parametrize("window", [(0, -1), (4, 12), (0, 1), (30, 5), (100, 100)],
                         ids=["dense", "sink4-recent12", "recent1", "sink30-recent5", "window>cache"])
@pytest.mark.parametrize("sq", [1, 5])
def test_torch_path_matches_reference(window, sq):
    q, kv_c, k_pe, pos = _inputs(3, 4, sq, 70, 32, 16, seed=sq)
    out = la.latent_attention_torch(q, kv_c, k_pe, pos, 0.2, *window)
    ref = la.latent_attention_reference(q, kv_c, k_pe, pos, 0.2, *window)
    assert out.shape == (3, 4, sq, 32)
    assert (out - ref).abs().max().item() < 1e-5


def test_reference_equals_attention_over_expanded_keys():
    """softmax((W_UKᵀ q)·c + q_pe·k_pe)·c, then W_UV, equals attention with keys [W_UK c, k_pe]
    and values W_UV c: the absorbed form computes what the model computes."""
    B, H, Sk, R, Dr, dn, dv = 2, 4, 50, 32, 16, 24, 20
    g = torch.Generator().manual_seed(1)
    c, pe = torch.randn(B, Sk, R, generator=g, dtype=torch.float64), torch.randn(B, Sk, Dr, generator=g, dtype=torch.float64)
    w = torch.randn(H, dn + dv, R, generator=g, dtype=torch.float64) / math.sqrt(R)
    q_nope, q_pe = torch.randn(B, H, 1, dn, generator=g, dtype=torch.float64), torch.randn(B, H, 1, Dr, generator=g, dtype=torch.float64)
    pos = torch.tensor([[49], [20]])
    k = torch.cat([torch.einsum("hdr,bsr->bhsd", w[:, :dn], c), pe[:, None].expand(-1, H, -1, -1)], -1)
    v = torch.einsum("hdr,bsr->bhsd", w[:, dn:], c)
    expected = sparse_attention_reference(torch.cat([q_nope, q_pe], -1), k, v, pos, 0, Sk, 0.3)
    q_lat = torch.cat([torch.einsum("bhqd,hdr->bhqr", q_nope, w[:, :dn]), q_pe], -1)
    out = torch.einsum("bhqr,hdr->bhqd", la.latent_attention_reference(q_lat, c, pe, pos, 0.3, 0, -1), w[:, dn:])
    assert (out - expected).abs().max().item() < 1e-5  # both references compute in float32


def test_rows_that_see_nothing_are_zero_and_bf16_keeps_dtype():
    q, kv_c, k_pe, pos = _inputs(2, 2, 1, 20, 16, 16)
    pos[1, 0] = -1  # a padding row
    out = torch.ops.omni.latent_attention(q, kv_c, k_pe, pos, 0.1, 0, -1)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    qb, cb, pb = q.bfloat16(), kv_c.bfloat16(), k_pe.bfloat16()
    outb = torch.ops.omni.latent_attention(qb, cb, pb, pos, 0.1, 4, 8)
    assert outb.dtype == torch.bfloat16
    ref = la.latent_attention_reference(qb, cb, pb, pos, 0.1, 4, 8)
    assert (outb.float() - ref.float()).abs().max().item() < 2e-2


def test_op_compiles_fullgraph():
    q, kv_c, k_pe, pos = _inputs(2, 4, 1, 64, 32, 16)

    def f(q, kv_c, k_pe, pos):
        return torch.ops.omni.latent_attention(q, kv_c, k_pe, pos, 0.1, 4, 8) * 2

    out = torch.compile(f, fullgraph=True)(q, kv_c, k_pe, pos)
    assert (out - 2 * la.latent_attention_reference(q, kv_c, k_pe, pos, 0.1, 4, 8)).abs().max().item() < 1e-5


@pytest.mark.parametrize("change, message", [
    (dict(sink=-1, recent=4), "sink must be an int >= 0"),
    (dict(recent=0), "recent must be an int >= 1"),
    (dict(q=torch.randn(2, 4, 64)), "q must be 4-D"),
    (dict(kv_c=torch.randn(2, 1, 64, 32)), "kv_c must be 3-D"),
    (dict(k_pe=torch.randn(2, 63, 16)), "kv_c has 64 cached tokens but k_pe 63"),
    (dict(q=torch.randn(2, 4, 1, 40)), "q's last dim 40 != kv_c's 32 + k_pe's 16"),
    (dict(k_pe=torch.randn(2, 64, 16, dtype=torch.float64)), "must share a dtype"),
    (dict(q_pos=torch.zeros(2, 1)), "q_pos must be int64 or int32"),
    (dict(q_pos=torch.zeros(2, 2, dtype=torch.int64)), "q_pos must have shape"),
])
def test_bad_arguments_name_the_problem(change, message):
    q, kv_c, k_pe, pos = _inputs(2, 4, 1, 64, 32, 16)
    args = dict(q=q, kv_c=kv_c, k_pe=k_pe, q_pos=pos, scale=0.1, sink=0, recent=-1)
    args.update(change)
    with pytest.raises(ValueError, match=re.escape(message)):
        torch.ops.omni.latent_attention(**args)
