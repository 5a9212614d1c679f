"""The latent-attention pass on CPU.

Whole models (transformers DeepSeek-V3 tiny, both attention forms; a DeepSeek-V2 with V2-Lite's
attention dimensions), fp32, static cache, prefill then decode steps: the compiled model equals
eager (the masked eager with sparse_attention on) within 1e-5 relative, the decode graph holds
one latent op per layer and no key assembly, prefill graphs are left alone, one decode graph
serves every step (fullgraph, no graph breaks). Small traced graphs cover each form of the
expansion and key assembly, the window, and the graphs the pass must leave untouched."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import omni_passes
from omni_passes.fx.latent_attention import LatentAttentionPass
from omni_passes.fx.utils import target_name
from omni_passes.kvcache.attention import masked_reference
from omni_passes.models import TINY_V3, build_model, load_hf_config

SINK, RECENT = 4, 8
REL = 1e-5  # fp32: compiled vs eager rounding only


def v2_lite_like(tmp_path_factory, layers=2):
    """DeepSeek-V2 architecture with V2-Lite's attention (16 heads, no q LoRA, latent 512 + rope 64,
    nope 128, v 128); small hidden size and experts so it compiles in seconds."""
    import json

    config = dict(TINY_V3, model_type="deepseek_v2", num_hidden_layers=layers, hidden_size=256,
                  num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
                  qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_group=1, topk_group=1,
                  topk_method="greedy", n_routed_experts=8, num_experts_per_tok=2)
    directory = tmp_path_factory.mktemp("v2_lite_like")
    (directory / "config.json").write_text(json.dumps(config))
    return load_hf_config(str(directory))


MODELS = {
    "v3-tiny-math": lambda tmp: load_hf_config("tiny", layers=3),
    "v3-tiny-sdpa": lambda tmp: load_hf_config("tiny", layers=2, overrides={"v_head_dim": 32}),
    "v2-lite-like": v2_lite_like,
}


def decode_logits(forward, config, ids, steps):
    """Prefill ``ids`` then ``steps`` decode steps fed the given tokens; logits [B, steps + 1, V]."""
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=ids.shape[1] + steps + 4)
    out = [forward(ids[:, :-steps], cache)]
    for i in range(steps):
        out.append(forward(ids[:, -steps + i:][:, :1], cache))
    return torch.stack(out, 1)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "with-sparse"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_model_decode_equals_eager(model_name, sparse, tmp_path_factory):
    if model_name == "v3-tiny-sdpa" and not sparse:
        pytest.skip("covered by the with-sparse case: its layer 0 is dense")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = MODELS[model_name](tmp_path_factory)
    model = build_model(config, seed=0)
    ids = torch.randint(0, config.vocab_size, (2, 26), generator=torch.Generator().manual_seed(5))
    pattern = [1]
    steps = 6

    def forward(module):
        return lambda x, cache: module(x, past_key_values=cache, use_cache=True).logits[:, -1]

    with torch.no_grad():
        if sparse:
            with masked_reference(model, SINK, RECENT, pattern):
                reference = decode_logits(forward(model), config, ids, steps)
            dense = decode_logits(forward(model), config, ids, steps)
        else:
            reference = decode_logits(forward(model), config, ids, steps)
    passes = ["sparse_attention", "latent_attention"] if sparse else ["latent_attention"]
    compiled = omni_passes.compile(model, {"passes": passes, "sparse_attention":
                                           {"sink": SINK, "recent": RECENT, "pattern": pattern}})
    graphs = []
    compiled.omni.manager.on_graph = lambda stage, graph, _r: graphs.append((stage, _op_counts(graph)))
    with torch.no_grad():
        out = decode_logits(forward(compiled), config, ids, steps)

    layers = list(range(config.num_hidden_layers))
    assert (out - reference).abs().max().item() <= REL * reference.abs().max().item()
    if sparse:  # positions 20..25 > sink + recent: the window is real
        assert (dense - reference).abs().max().item() > 100 * REL * reference.abs().max().item()
    report = compiled.omni.report()["passes"]["latent_attention"]
    assert report["matched_layers"] == layers and report["skipped"] == []
    assert any("prefill" in note for note in report["notes"])
    assert compiled.omni.manager.graphs_seen == 2  # prefill + one decode graph for every step
    assert not torch._dynamo.utils.counters["graph_break"]
    (_, prefill_before), (_, prefill_after), (_, decode_before), (_, decode_after) = graphs
    assert prefill_after["omni.latent_attention"] == 0
    assert prefill_after["aten.slice_scatter"] == prefill_before["aten.slice_scatter"]
    assert decode_after["omni.latent_attention"] == len(layers)
    assert decode_after["aten.slice_scatter"] == 0 < decode_before["aten.slice_scatter"]  # no key assembly left
    assert decode_after["omni.sparse_attention"] == 0  # taken over: selection at the latent read
    if sparse:
        assert any(f"layers {pattern}: sink + recent" in note for note in report["notes"])


def _op_counts(graph):
    counts = {"omni.latent_attention": 0, "omni.sparse_attention": 0, "aten.slice_scatter": 0}
    for node in graph.nodes:
        name = target_name(node).rsplit(".", 1)[0]
        if name in counts:
            counts[name] += 1
    return counts


# ----------------------------------------------------------------------------- traced graphs
B, H, SK, R, DR, DN, DV = 2, 4, 30, 32, 16, 24, 20
POS = torch.tensor([29, 10])


def _mla(q_nope, q_pe, latent, k_pe, w, pos, key="cat", form="sdpa", bias=None, window=None, float_bias=None,
         pad=False):
    """One MLA decode attention as transformers writes it (expansion, key assembly, attention)."""
    j = torch.arange(latent.shape[2])
    allowed = j[None, :] <= pos[:, None]
    if window is not None:
        allowed = allowed & ((j[None, :] < window[0]) | (j[None, :] > pos[:, None] - window[1]))
    mask = torch.where(allowed, 0.0, float("-inf"))[:, None, None, :]
    if float_bias is not None:
        mask = mask + float_bias
    if pad:  # as SDPA's memory-efficient kernel does on CUDA when Sk is not a multiple of 16
        mask = F.pad(mask, (0, 2))[..., :latent.shape[2]]
    kv = F.linear(latent, w, bias).view(B, latent.shape[2], H, DN + DV).transpose(1, 2)
    k_nope, v = torch.split(kv, [DN, DV], -1)
    k_e = k_pe.expand(-1, H, -1, -1)
    if key == "cat":
        k = torch.cat([k_nope, k_e], -1)
    else:  # new_empty + copy_, as transformers' expand_kv
        k = kv.new_empty(B, H, latent.shape[2], DN + DR)
        k[..., :DN].copy_(k_nope)
        k[..., DN:].copy_(k_e)
    q = torch.cat([q_nope, q_pe], -1)
    if form == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)
    return torch.softmax(q @ k.transpose(-1, -2) * 0.2 + mask, -1) @ v


def _inputs(sq=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, sq, DN, generator=g), torch.randn(B, H, sq, DR, generator=g),
            torch.randn(B, 1, SK, R, generator=g), torch.randn(B, 1, SK, DR, generator=g),
            torch.randn(H * (DN + DV), R, generator=g) / 5]


def _trace(fn, *args, decompose=False):
    from torch._decomp import core_aten_decompositions

    return make_fx(torch.func.functionalize(fn), tracing_mode="fake",
                   decomposition_table=core_aten_decompositions() if decompose else None)(*args)


@pytest.mark.parametrize("window", [None, (3, 7)], ids=["dense", "window"])
@pytest.mark.parametrize("form", ["sdpa", "math"])
@pytest.mark.parametrize("key", ["cat", "copy-into-empty"])
def test_traced_mla_rewritten_and_equal(key, form, window):
    args = _inputs()
    gm = _trace(lambda *a: _mla(*a, key=key, form=form), *args, POS, decompose=form == "math")
    pass_ = LatentAttentionPass(window=window, pattern=[0] if window else ())
    report = pass_(gm.graph)
    gm.recompile()
    assert report.matched_layers == [0] and report.skipped == []
    assert not [n for n in gm.graph.nodes if target_name(n).startswith(("aten.mm", "aten._scaled_dot"))]
    expected = _mla(*args, POS, key=key, form=form, window=window)
    assert (gm(*args, POS) - expected).abs().max().item() < 1e-5


def test_padded_mask_is_still_a_mask():
    args = _inputs(seed=4)
    gm = _trace(lambda *a: _mla(*a, pad=True), *args, POS)
    assert LatentAttentionPass()(gm.graph).matched_layers == [0]
    gm.recompile()
    assert (gm(*args, POS) - _mla(*args, POS)).abs().max().item() < 1e-5


def test_prefill_graph_left_alone():
    args = _inputs(sq=5)
    gm = _trace(lambda *a: _mla(*a), *args, POS)
    before = gm.graph.python_code("self").src
    report = LatentAttentionPass()(gm.graph)
    assert report.matched_layers == [] and report.skipped == []
    assert "[5] queries per sequence" in report.notes[-1] and "prefill" in report.notes[-1]
    assert gm.graph.python_code("self").src == before


@pytest.mark.parametrize("case, reason", [
    ("mha", "not cat(q_nope, q_rope)"),
    ("bias", "kv_b_proj has a bias"),
    ("float-bias", "float bias"),
    ("per-head-rope", "not shared by all heads"),
])
def test_unsupported_graphs_untouched_with_reason(case, reason):
    args = _inputs()
    g = torch.Generator().manual_seed(9)
    if case == "mha":
        q, k, v = (torch.randn(B, H, n, DN, generator=g) for n in (1, SK, SK))
        fn, inputs = (lambda q, k, v, p: F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.arange(SK)[None, None, None, :] <= p[:, None, None, None])), (q, k, v, POS)
    elif case == "bias":
        bias = torch.randn(H * (DN + DV), generator=g)
        fn, inputs = (lambda *a: _mla(*a[:6], bias=a[6])), (*args, POS, bias)
    elif case == "float-bias":
        alibi = torch.randn(SK, generator=g)
        fn, inputs = (lambda *a: _mla(*a[:6], float_bias=a[6])), (*args, POS, alibi)
    else:  # a rope key per head is not MLA's shared one
        args[3] = torch.randn(B, H, SK, DR, generator=g)
        fn, inputs = (lambda *a: _mla(*a)), (*args, POS)
    gm = _trace(fn, *inputs)
    before = gm.graph.python_code("self").src
    report = LatentAttentionPass()(gm.graph)
    assert report.matched_layers == []
    assert len(report.skipped) == 1 and reason in report.skipped[0].reason, report.skipped
    assert gm.graph.python_code("self").src == before


def test_graph_without_attention_untouched():
    from omni_passes.testing.graphs import routed_graph

    gm = routed_graph()
    before = gm.graph.python_code("self").src
    report = LatentAttentionPass()(gm.graph)
    assert report.matched_layers == [] and report.skipped == []
    assert report.notes == ["no attention found in this graph"]
    assert gm.graph.python_code("self").src == before


@pytest.mark.slow  # imports vLLM (about 20 s) to build its MLA op node
def test_vllm_mla_graph_skipped_with_reason():
    """vLLM's MLA op already attends on the latent: the pass leaves it and says so."""
    import vllm.model_executor.layers.attention.mla_attention  # noqa: F401  (registers the op)
    from torch._higher_order_ops.auto_functionalize import auto_functionalized

    graph = torch.fx.Graph()
    fake = torch._subclasses.FakeTensorMode()
    inputs = {}
    for name, shape in (("q", (4, 8, 576)), ("kv_c_normed", (4, 512)), ("k_pe", (4, 1, 64)), ("output", (4, 8 * 512))):
        inputs[name] = graph.placeholder(name)
        inputs[name].meta["val"] = fake.from_tensor(torch.empty(shape))
    node = graph.call_function(auto_functionalized, (torch.ops.vllm.unified_mla_attention_with_output.default,),
                               dict(inputs, layer_name="model.layers.3.self_attn.attn"))
    graph.output(node)
    before = str(graph)
    report = LatentAttentionPass()(graph)
    assert report.matched_layers == []
    assert [(s.layer, "vLLM already attends on the cached latent" in s.reason) for s in report.skipped] == [(3, True)]
    assert str(graph) == before


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_queries"):
        LatentAttentionPass(max_queries=0)
    with pytest.raises(ValueError, match="window"):
        LatentAttentionPass(window=(2, 0), pattern=[0])


def test_config_names_the_pass():
    from omni_passes.config import ConfigError, PassConfig

    assert "latent_attention" in PassConfig.from_dict({"passes": ["latent_attention"]}).passes
    with pytest.raises(ConfigError, match="unknown pass"):
        PassConfig.from_dict({"passes": ["latent_atention"]})


def test_math_scale_folds_from_both_sides():
    """transformers' math form scales q and k by sqrt(scale) each: the op gets the product."""
    args = _inputs(seed=3)

    def fn(q_nope, q_pe, latent, k_pe, w, pos):
        kv = F.linear(latent, w).view(B, SK, H, DN + DV).transpose(1, 2)
        k_nope, v = torch.split(kv, [DN, DV], -1)
        k = torch.cat([k_nope, k_pe.expand(-1, H, -1, -1)], -1)
        q = torch.cat([q_nope, q_pe], -1)
        mask = torch.where(torch.arange(SK)[None, :] <= pos[:, None], 0.0, float("-inf"))[:, None, None, :]
        s = math.sqrt(0.3)
        return torch.softmax((q * s) @ (k.transpose(-1, -2) * s) + mask, -1) @ v

    gm = _trace(fn, *args, POS, decompose=True)
    assert LatentAttentionPass()(gm.graph).matched_layers == [0]
    gm.recompile()
    assert (gm(*args, POS) - fn(*args, POS)).abs().max().item() < 1e-5
