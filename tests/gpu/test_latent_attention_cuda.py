"""omni::latent_attention on CUDA: the Triton split-KV kernel against the fp32 reference over
shapes, windows, dtypes, cache layouts and launch variants; inside torch.compile + CUDA graphs;
and the latent pass on a whole transformers DeepSeek-V3 on the GPU (run on the H200)."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from kernels import latent_attention as la  # noqa: E402
from kernels import triton_sparse_attention as tsa  # noqa: E402

DEV = torch.device("cuda")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _inputs(B, H, Sk, R, Dr, dtype, seed, combined=False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, H, 1, R + Dr, generator=g, device=DEV).to(dtype)
    if combined:  # one [B, Sk, R + Dr] cache, passed as two strided views
        kv = torch.randn(B, Sk, R + Dr, generator=g, device=DEV).to(dtype)
        kv_c, k_pe = kv[..., :R], kv[..., R:]
    else:
        kv_c = torch.randn(B, Sk, R, generator=g, device=DEV).to(dtype)
        k_pe = torch.randn(B, Sk, Dr, generator=g, device=DEV).to(dtype)
    pos = torch.randint(0, Sk, (B, 1), generator=g, device=DEV)
    pos[0, 0] = Sk - 1
    if B > 1:
        pos[1, 0] = min(3, Sk - 1)  # a short prefix: most splits see nothing
    return q, kv_c, k_pe, pos


# (B, H, Sk, R, Dr, sink, recent); recent -1 = dense
SHAPES = [
    (16, 16, 4096, 512, 64, 0, -1),      # DeepSeek-V2-Lite heads, dense
    (4, 128, 2048, 512, 64, 0, -1),      # DeepSeek-V3 heads, dense
    (16, 16, 4096, 512, 64, 128, 384),   # sink + recent
    (4, 128, 3000, 512, 64, 128, 384),
    (3, 20, 1000, 512, 64, 0, -1),       # heads not a multiple of the head block
    (5, 16, 100, 512, 64, 128, 384),     # cache shorter than sink + recent
    (2, 8, 777, 128, 32, 0, -1),         # other latent / rope dims
    (2, 8, 777, 256, 64, 16, 32),
    (1, 16, 9000, 512, 64, 0, 1),        # recent 1: only the query's own row
]


@pytest.mark.parametrize("combined", [False, True], ids=["two-tensors", "strided-views"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(shape, dtype, combined):
    B, H, Sk, R, Dr, sink, recent = shape
    q, kv_c, k_pe, pos = _inputs(B, H, Sk, R, Dr, dtype, seed=sum(shape), combined=combined)
    assert tsa.supports_latent(q, kv_c, k_pe)
    scale = 1 / math.sqrt(192)
    out = torch.ops.omni.latent_attention(q, kv_c, k_pe, pos, scale, sink, recent)
    ref = la.latent_attention_reference(q, kv_c, k_pe, pos, scale, sink, recent)
    assert out.shape == (B, H, 1, R) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < TOL[dtype]


# What the benchmark's tuning sweep tries: every variant must be exact, not only the default.
VARIANTS = [dict(num_splits=n) for n in (1, 5, 33, 64)] + [
    dict(block_n=32), dict(block_n=128, num_stages=1), dict(num_stages=3, block_n=32), dict(num_warps=4),
    dict(block_g=32), dict(block_g=64, num_warps=8), dict(programs_per_sm=4),
]


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("window", [(0, 6000), (128, 384)], ids=["dense", "sink-recent"])
@pytest.mark.parametrize("override", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_launch_variants(override, window, heads):
    q, kv_c, k_pe, pos = _inputs(4, heads, 6000, 512, 64, torch.bfloat16, seed=len(override) + heads)
    out = tsa.latent_decode(q, kv_c, k_pe, pos, *window, 0.07, **override)
    ref = la.latent_attention_reference(q, kv_c, k_pe, pos, 0.07, *window)
    assert _rel_err(out, ref) < TOL[torch.bfloat16]


def test_prefill_shapes_and_odd_layouts_take_the_torch_path():
    q, kv_c, k_pe, pos = _inputs(2, 4, 300, 512, 64, torch.bfloat16, seed=9)
    q3 = torch.randn(2, 4, 3, 576, device=DEV, dtype=torch.bfloat16)  # three queries per row
    pos3 = torch.tensor([[297, 298, 299], [10, 11, 12]], device=DEV)
    for window in ((0, -1), (16, 32)):
        out = torch.ops.omni.latent_attention(q3, kv_c, k_pe, pos3, 0.1, *window)
        assert _rel_err(out, la.latent_attention_reference(q3, kv_c, k_pe, pos3, 0.1, *window)) < TOL[torch.bfloat16]
    kv_t = torch.randn(2, 512, 300, device=DEV, dtype=torch.bfloat16).transpose(1, 2)  # latent dim not contiguous
    assert not tsa.supports_latent(q, kv_t, k_pe)
    out = torch.ops.omni.latent_attention(q, kv_t, k_pe, pos, 0.1, 0, -1)
    assert _rel_err(out, la.latent_attention_reference(q, kv_t, k_pe, pos, 0.1, 0, -1)) < TOL[torch.bfloat16]


def test_compiled_in_cuda_graph_positions_change_in_place():
    q, kv_c, k_pe, pos = _inputs(4, 16, 4096, 512, 64, torch.bfloat16, seed=7)

    def step(q, kv_c, k_pe, pos):
        return torch.ops.omni.latent_attention(q, kv_c, k_pe, pos, 0.088, 0, -1) * 2.0

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for p in (4095, 900, 10):
        pos.fill_(p)
        pos[0, 0] = 4095 - p
        out = compiled(q, kv_c, k_pe, pos).clone()
        ref = 2.0 * la.latent_attention_reference(q, kv_c, k_pe, pos, 0.088, 0, -1)
        assert _rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pass_on_cuda_model_equals_eager(dtype):
    """Tiny DeepSeek-V3 on the GPU (SDPA node form), static cache: the latent pass (+ sparse on
    layer 1) against eager (masked eager), fp32 tight; bf16 within the compile noise."""
    from transformers import StaticCache

    import omni_passes
    from omni_passes.kvcache.attention import masked_reference
    from omni_passes.models import build_model, load_hf_config

    config = load_hf_config("tiny", layers=2)
    ids = torch.randint(0, 256, (4, 1), generator=torch.Generator().manual_seed(0)).to(DEV)

    def step(module, model):
        cache = StaticCache(config=config, max_cache_len=600)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.zeros(1, dtype=torch.long, device=DEV))
            g = torch.Generator(device=DEV).manual_seed(1)
            for layer in cache.layers:
                for t in (layer.keys, layer.values):
                    t.copy_(torch.randn(t.shape, generator=g, device=DEV))
                layer.cumulative_length.fill_(599)  # the step's position: the cache's write counter
            return module(input_ids=ids, past_key_values=cache, use_cache=True,
                          cache_position=torch.tensor([599], device=DEV)).logits.float()

    results = {}
    for name, passes in (("compiled", []), ("latent", ["latent_attention"]),
                         ("latent+sparse", ["sparse_attention", "latent_attention"])):
        torch._dynamo.reset()
        model = build_model(config, dtype=dtype, device="cuda", seed=0)
        if name == "compiled":
            results["eager"] = step(model, model)
            with masked_reference(model, 16, 48, [1]):
                results["masked"] = step(model, model)
        compiled = omni_passes.compile(model, {"passes": passes,
                                               "sparse_attention": {"sink": 16, "recent": 48, "pattern": [1]}})
        results[name] = step(compiled, model)
        if passes:
            assert compiled.omni.report()["passes"]["latent_attention"]["matched_layers"] == [0, 1]
    scale = results["eager"].abs().max().item()
    noise = (results["compiled"] - results["eager"]).abs().max().item()
    bound = 1e-4 * scale if dtype == torch.float32 else max(2e-2 * scale, 2 * noise)
    assert (results["latent"] - results["eager"]).abs().max().item() <= bound
    assert (results["latent+sparse"] - results["masked"]).abs().max().item() <= bound
    assert (results["masked"] - results["eager"]).abs().max().item() > bound  # the window changed something
