"""torchair's real FX → GE pipeline on CPU, with the omni passes on its real post-grad hook; every
GE op our converters emit, checked against torchair's shipped IR prototypes; the GE graphs they
build, run by an EMULATOR against the PyTorch references.

STAND-IN, stated plainly: torchair is the Python package shipped in torch-npu 2.13.0
(``torch_npu/dynamo/torchair``, unpacked by ``make install``), all of it real except its one
native extension ``torchair.core._torchair`` (CANN's Graph Engine), which
``omni_passes/testing/torchair_native_standin.py`` replaces. The stand-in builds nothing: it
lets torchair construct its per-graph executor object and raises on anything that would
compile or run a GE graph. So these tests run torchair's aot_autograd compile, its FX passes,
its ``CompilerConfig.post_grad_custom_post_pass`` hook, every FX → GE converter (torchair's and
ours) and its text dump of the GE graph; with ``debug.run_eagerly`` the rewritten FX graph then
runs on CPU. Nothing here is compiled by CANN or runs on an NPU.

EMULATION, stated plainly: ``omni_passes/testing/ge_emulator.py`` runs a dumped GE graph with
torch implementations of the IR ops (this project's reading of their documented semantics). It
checks the arithmetic each converter's graph describes and gives each edge a concrete dtype for
the prototype check; it is not CANN, and says nothing of CANN kernel support or NPU numerics.

One module, so that torchair is imported once and taken out of the process afterwards
(``omni_passes.testing.ascend.unload``): later tests in the session see no torchair.
"""

from __future__ import annotations

import glob

import pytest
import torch

from omni_passes.registry import prepare
from omni_passes.config import PassConfig
from omni_passes.models import build_model, load_hf_config
from omni_passes.placement.placement import Placement
from omni_passes.testing.ascend import import_torchair
from omni_passes.testing.ge_emulator import GEEmulator
from omni_passes.testing.ge_ir import PLUMBING, check_dtypes, check_op, load_graph, load_prototypes

pytestmark = pytest.mark.torchair

ATOL = 1e-5  # fp32 on CPU; run_eagerly runs the same aten ops as eager, routing identical
SINK, RECENT = 4, 8
INPUTS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def torchair():
    from omni_passes.testing.ascend import unload
    from omni_passes.hosts.torchair import register_converters

    module, info = import_torchair()
    assert info.native == "stand-in" and info.version == "2.13.0"
    register_converters()
    yield module
    unload()


@pytest.fixture(scope="module")
def protos(torchair):
    return load_prototypes()


def compile_with_torchair(torchair, model, pass_config: dict, dump_dir, placement=None):
    """torch.compile(model, backend=torchair.get_npu_backend(config)) with the omni passes on
    config.post_grad_custom_post_pass, run_eagerly and a text dump of the GE graph."""
    from omni_passes.hosts.torchair import torchair_backend

    runtime = prepare(model, PassConfig.from_dict(pass_config), placement)
    config = torchair.CompilerConfig()
    config.debug.run_eagerly = True
    config.debug.graph_dump.type = "txt"
    config.debug.graph_dump.path = str(dump_dir)
    backend = torchair_backend(runtime.manager, config, torchair=torchair)
    assert config.post_grad_custom_post_pass.value is not None  # ours, on torchair's own option
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True), runtime


def dumped_graph(dump_dir):
    files = glob.glob(str(dump_dir / "dynamo_original_graph_*.txt"))
    assert len(files) == 1, files
    return load_graph(files[0])


def op_counts(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in graph.op:
        counts[op.type] = counts.get(op.type, 0) + 1
    return counts


def reference_loads(model) -> torch.Tensor:
    """bincount of the experts the eager model's routers choose for INPUTS: [moe_layers, experts]."""
    chosen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: chosen.append(out[2].clone()))
             for layer in model.model.layers[1:]]
    with torch.no_grad():
        model(INPUTS)
    for hook in hooks:
        hook.remove()
    return torch.stack([torch.bincount(ids.flatten(), minlength=16) for ids in chosen])


def permuted_placement(experts=16, layers=3) -> Placement:
    generator = torch.Generator().manual_seed(11)
    phy2log = torch.stack([torch.randperm(experts, generator=generator) for _ in range(layers)])
    return Placement(num_layers=layers, num_logical_experts=experts, num_ranks=2, num_nodes=1,
                     slots_per_rank=experts // 2, phy2log=phy2log)


def permuted_hot_replica_placement(experts=16, layers=3) -> Placement:
    """Experts moved between slots and 8 redundant slots (experts with 1 to 4 replicas)."""
    generator = torch.Generator().manual_seed(12)
    extra = torch.tensor([3, 3, 7, 0, 12, 5, 5, 5])
    phy2log = torch.stack([torch.cat([torch.randperm(experts, generator=generator), (extra + shift) % experts])
                           for shift in range(layers)])
    return Placement(num_layers=layers, num_logical_experts=experts, num_ranks=2, num_nodes=1,
                     slots_per_rank=phy2log.shape[1] // 2, phy2log=phy2log)


PLACEMENTS = {"identity": lambda: None, "permuted+redundant": permuted_hot_replica_placement,
              "permuted": permuted_placement}
PLACEMENT_CASES = [
    "identity",
    "permuted+redundant",
    "permuted",  # exact since issue 13: a slot names a storage row, and row e holds expert e
]


@pytest.mark.slow  # a whole-model compile
@pytest.mark.parametrize("placement_kind", PLACEMENT_CASES)
def test_dispatch_pass_through_torchair_hook_and_ge_conversion(torchair, protos, tmp_path, placement_kind):
    model = build_model(load_hf_config("tiny"))
    with torch.no_grad():
        reference = model(INPUTS).logits
    placement = PLACEMENTS[placement_kind]()
    expected_loads = reference_loads(model)  # per logical expert, whatever the placement
    compiled, runtime = compile_with_torchair(torchair, model, {"passes": ["redundant_experts"]}, tmp_path, placement)
    with torch.no_grad():
        out = compiled(INPUTS).logits
    report = runtime.report()
    assert report["graphs"] == 1                       # the manager ran once: from torchair's hook
    assert report["passes"]["redundant_experts"]["matched_layers"] == [1, 2, 3]
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
    assert torch.equal(runtime.controller.expert_load, expected_loads)
    assert runtime.controller.expert_load.sum(1).tolist() == [INPUTS.numel() * 4] * 3

    graph = dumped_graph(tmp_path)
    counts = op_counts(graph)
    # our converters' signature ops, one set per MoE layer; torchair's grouped GEMM gap filled
    assert counts.get("Cummax") == 3 and counts.get("GatherNd") == 3 and counts.get("FloorMod") == 3
    assert counts.get("GroupedMatmul") == 6 and counts.get("UnsortedSegmentSum") == 3
    # every op of the kinds our converters emit conforms to its IR prototype, wherever it came from
    ours = {"Cast", "Reshape", "Size", "Sort", "Range", "Slice", "ConcatV2", "NotEqual", "SelectV2", "ZerosLike",
            "Cummax", "Sub", "ScatterNd", "ExpandDims", "GatherV2", "FloorMod", "GatherNd", "Pack", "Shape",
            "GroupedMatmul", "Fill", "UnsortedSegmentSum", "Floor", "Minimum", "Maximum", "LogicalAnd",
            "GreaterEqual", "LessEqual", "Mul", "TensorScatterUpdate", "BroadcastTo", "Less", "Add"}
    problems = [p for op in graph.op if op.type in ours for p in check_op(op, protos)]
    assert problems == []


# torchair's own converters emit these with dtypes their prototypes do not list (aten.tril on the
# bool causal mask: Tril; aten.topk: TopKV2's k as int64, prototype int32). Not ours; left alone.
TORCHAIR_OWN_DTYPE_DEVIATIONS = {"Tril", "TopKV2"}


@pytest.mark.slow  # a whole-model compile
def test_sparse_attention_and_dispatch_through_torchair(torchair, protos, tmp_path, monkeypatch):
    """Also runs the whole dumped GE graph in the emulator, on the arguments torchair's compiled
    graph received, and checks it reproduces the logits."""
    import torchair.npu_fx_compiler as fx_compiler

    from omni_passes.kvcache.attention import masked_reference

    graph_args = []
    original_call = fx_compiler._CompiledFxGraph.__call__

    def recording_call(self, *args, **kwargs):  # records, then runs torchair's own call
        graph_args.append([a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args])
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(fx_compiler._CompiledFxGraph, "__call__", recording_call)

    model = build_model(load_hf_config("tiny"))
    pattern = [0, 2]
    with torch.no_grad():
        with masked_reference(model, SINK, RECENT, pattern):
            reference = model(INPUTS).logits
        dense = model(INPUTS).logits
    config = {"passes": ["redundant_experts", "sparse_attention"],
              "sparse_attention": {"sink": SINK, "recent": RECENT, "pattern": pattern}}
    compiled, runtime = compile_with_torchair(torchair, model, config, tmp_path)
    with torch.no_grad():
        out = compiled(INPUTS).logits
    report = runtime.report()["passes"]
    assert report["sparse_attention"]["matched_layers"] == pattern
    assert report["redundant_experts"]["matched_layers"] == [1, 2, 3]
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
    assert (out - dense).abs().max() > 1e-2  # 24 tokens > sink + recent: the pass changes attention
    graph = dumped_graph(tmp_path)
    counts = op_counts(graph)
    assert counts.get("Assert", 0) >= 1            # mask_positions' check, kept in the GE graph
    problems = [p for op in graph.op if op.type in {"Assert", "ReduceAll", "ReduceSum", "Equal", "Identity",
                                                     "SoftmaxV2", "BatchMatMulV2", "LogicalOr", "Greater"}
                for p in check_op(op, protos)]
    assert problems == []

    # EMULATION of the whole GE graph (torchair's converters and ours): the same logits
    emulator = GEEmulator(graph, protos)
    outputs = emulator.run(graph_args[0])
    logits = [o for o in outputs if tuple(o.shape) == tuple(out.shape)]
    assert min(float((o - out).abs().max()) for o in logits) <= ATOL
    deviations = {op.type for op in graph.op if op.type not in PLUMBING
                  and check_dtypes(op, protos[op.type], *emulator.dtypes[op.name])}
    assert deviations <= TORCHAIR_OWN_DTYPE_DEVIATIONS, deviations


@pytest.mark.slow  # a whole-model compile
def test_latent_and_sparse_attention_decode_through_torchair(torchair, protos, tmp_path):
    """Static-cache decode (prefill graph + one decode graph): the latent_attention pass takes over
    the decode steps' attention, sink + recent on the pattern layer (torchair lacks a converter for
    the cache update, aten.index_copy: ours fills it)."""
    from transformers import StaticCache

    from omni_passes.kvcache.attention import masked_reference

    config = load_hf_config("tiny", layers=2)
    model = build_model(config)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(6))
    pattern, steps = [1], 3

    def decode(forward):
        cache = StaticCache(config=config, max_cache_len=ids.shape[1] + 4)
        logits = [forward(ids[:, :-steps], cache)]
        for i in range(steps):
            logits.append(forward(ids[:, ids.shape[1] - steps + i:][:, :1], cache))
        return torch.stack(logits, 1)

    def step(module):
        return lambda x, cache: module(x, past_key_values=cache, use_cache=True).logits[:, -1]

    with torch.no_grad():
        with masked_reference(model, SINK, RECENT, pattern):
            reference = decode(step(model))
    passes = {"passes": ["sparse_attention", "latent_attention"],
              "sparse_attention": {"sink": SINK, "recent": RECENT, "pattern": pattern}}
    compiled, runtime = compile_with_torchair(torchair, model, passes, tmp_path)
    with torch.no_grad():
        out = decode(step(compiled))
    report = runtime.report()
    assert report["graphs"] == 2 and report["passes"]["latent_attention"]["matched_layers"] == [0, 1]
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
    graphs = [load_graph(f) for f in sorted(glob.glob(str(tmp_path / "dynamo_original_graph_*.txt")))]
    assert len(graphs) == 2
    decode_graph = max(graphs, key=lambda g: op_counts(g).get("ConcatV2", 0))
    ours = {"ConcatV2", "ExpandDims", "BatchMatMulV2", "SoftmaxV2", "SelectV2", "TensorScatterUpdate", "Transpose",
            "Assert", "ReduceAll"}
    assert {"TensorScatterUpdate", "BatchMatMulV2"} <= set(op_counts(decode_graph))
    assert [p for g in graphs for op in g.op if op.type in ours for p in check_op(op, protos)] == []


@pytest.mark.slow  # a whole-model compile
def test_stale_tables_refused_in_ge_mode(torchair, tmp_path):
    """Without run_eagerly the GE graph holds the tables as constants: applying a placement that
    changes them after the graph was built must make the compiled callable refuse to run, not
    run stale tables. (A pure permutation changes no table: every expert keeps its storage row.)"""
    from kernels.torchair_converters import StaleGEGraph
    from omni_passes.hosts.torchair import torchair_backend

    model = build_model(load_hf_config("tiny"))
    start = permuted_hot_replica_placement()
    runtime = prepare(model, PassConfig.from_dict({"passes": ["redundant_experts"]}), placement=start)
    backend = torchair_backend(runtime.manager, torchair.CompilerConfig(), torchair=torchair)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with pytest.raises(Exception) as first:  # the GE graph is built, then the stand-in cannot run it
        with torch.no_grad():
            compiled(INPUTS)
    assert "needs CANN" in str(first.value)
    moved = start.phy2log.clone()
    moved[:, 16:] = (moved[:, 16:] + 1) % 16                  # other experts get the replicas
    runtime.controller.apply(Placement(num_layers=3, num_logical_experts=16, num_ranks=2, num_nodes=1,
                                            slots_per_rank=start.slots_per_rank, phy2log=moved))
    with pytest.raises(StaleGEGraph, match="recompile"):
        with torch.no_grad():
            compiled(INPUTS)

# -- each converter alone: prototypes, emulated numerics, emulated dtypes ------------------------
# A small function calling one op goes through torchair.get_npu_backend (no omni pass: the
# converter alone); its GE graph is dumped and checked: every op against its prototype (names,
# arity, attributes), the emulated outputs against the op's reference, every emulated dtype
# against the prototype's accepted dtypes.

def ge_graph_of(torchair, fn, inputs, dump_dir):
    """Compile ``fn`` through torchair (run_eagerly, text dump); returns (eager result, GraphDef)."""
    config = torchair.CompilerConfig()
    config.debug.run_eagerly = True
    config.debug.graph_dump.type = "txt"
    config.debug.graph_dump.path = str(dump_dir)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=torchair.get_npu_backend(compiler_config=config), fullgraph=True)
    result = compiled(*inputs)
    files = glob.glob(str(dump_dir / "dynamo_original_graph_*.txt"))
    assert len(files) == 1, files
    return result, load_graph(files[0])


def check_graph(graph, protos, feeds, must_contain: set[str]):
    """Prototype conformance of every op, then emulation: returns the emulated outputs."""
    types = {op.type for op in graph.op}
    assert must_contain <= types, f"missing {must_contain - types}"
    problems = [p for op in graph.op for p in check_op(op, protos)]
    assert problems == []
    emulator = GEEmulator(graph, protos)
    outputs = emulator.run(feeds)
    dtype_problems = [p for op in graph.op if op.type not in PLUMBING
                      for p in check_dtypes(op, protos[op.type], *emulator.dtypes[op.name])]
    assert dtype_problems == []
    return outputs


def placement_tables(kind: str):
    from omni_passes.placement.placement import Placement
    from omni_passes.placement.controller import PlacementController

    experts = 8
    if kind == "identity":
        phy2log = torch.arange(experts).repeat(2, 1)
    elif kind == "permuted":
        phy2log = torch.stack([torch.randperm(experts, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    else:  # redundant: experts 0 and 5 get 3 and 2 replicas
        phy2log = torch.stack([torch.cat([torch.arange(experts), torch.tensor([0, 0, 5])])] * 2)
    placement = Placement(num_layers=2, num_logical_experts=experts, num_ranks=1, num_nodes=1,
                          slots_per_rank=phy2log.shape[1], phy2log=phy2log)
    return PlacementController(placement, layout="slot")


@pytest.mark.parametrize("kind", ["identity", "permuted", "redundant"])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_expert_dispatch(torchair, protos, tmp_path, kind, ids_dtype):
    state = placement_tables(kind)
    ids = torch.randint(0, 8, (13, 4), generator=torch.Generator().manual_seed(5)).to(ids_dtype)
    ids[:4] = 0  # expert 0 many times: every replica gets used

    def fn(topk_ids):
        return torch.ops.omni.expert_dispatch(topk_ids, state.handle, 1)

    eager, graph = ge_graph_of(torchair, fn, [ids], tmp_path)
    expected = torch.ops.omni.expert_dispatch(ids, state.handle, 1)
    assert torch.equal(eager, expected)
    (out,) = check_graph(graph, protos, [ids], {"Sort", "Cummax", "ScatterNd", "GatherNd", "FloorMod"})
    assert out.dtype == ids_dtype and torch.equal(out, expected)
    if kind == "redundant":
        assert len(set(out[ids == 0].tolist())) == 3  # expert 0's tokens spread over its 3 replicas


def test_histc(torchair, protos, tmp_path):
    x = torch.tensor([0.0, 1, 1, 7, 7, 7, 3.5, -1, 8, 6.99, 2])  # outside [0, 7] ignored; 7 is in the last bin

    def fn(values):
        return torch.histc(values, bins=8, min=0, max=7)

    eager, graph = ge_graph_of(torchair, fn, [x], tmp_path)
    (out,) = check_graph(graph, protos, [x], {"UnsortedSegmentSum"})
    torch.testing.assert_close(out, torch.histc(x, bins=8, min=0, max=7), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm(torchair, protos, tmp_path, dtype):
    from transformers.integrations.moe import _grouped_mm_fallback

    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(10, 6, generator=g).to(dtype), torch.randn(4, 6, 5, generator=g).to(dtype)
    offs = torch.tensor([3, 3, 7, 10], dtype=torch.int32)  # expert 1 gets no rows

    def fn(a, w, o):
        return torch.ops.transformers.grouped_mm_fallback(a, w, o)

    eager, graph = ge_graph_of(torchair, fn, [x, weight, offs], tmp_path)
    (out,) = check_graph(graph, protos, [x, weight, offs], {"GroupedMatmul"})
    torch.testing.assert_close(out, _grouped_mm_fallback(x, weight, offs), rtol=0, atol=0)


@pytest.mark.parametrize("accumulate", [False, True])
def test_index_put(torchair, protos, tmp_path, accumulate):
    perm = torch.tensor([3, 0, 4, 1, 2, -1])  # -1 wraps to 5
    base = torch.zeros(6, dtype=torch.int64)

    def fn(target, index):
        return torch.ops.aten.index_put.default(target, [index], torch.arange(6), accumulate)

    eager, graph = ge_graph_of(torchair, fn, [base, perm], tmp_path)
    scatter = "ScatterNd" if accumulate else "TensorScatterUpdate"
    (out,) = check_graph(graph, protos, [base, perm], {scatter})
    assert torch.equal(out, torch.ops.aten.index_put.default(base, [perm], torch.arange(6), accumulate))


def _attention_inputs(dtype, Hq=4, Hkv=2, Sq=5, Sk=19, D=8, Dv=6):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(2, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(2, Hkv, Sk, Dv, generator=g).to(dtype)
    q_pos = torch.tensor([[10, 11, 12, 13, 14], [14, 15, 16, 17, 18]])
    return q, k, v, q_pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attention(torchair, protos, tmp_path, dtype):
    from kernels.sparse_attention import sparse_attention_reference

    q, k, v, q_pos = _attention_inputs(dtype)

    def fn(q, k, v, q_pos):
        return torch.ops.omni.sparse_attention(q, k, v, q_pos, 3, 4, 0.35)

    eager, graph = ge_graph_of(torchair, fn, [q, k, v, q_pos], tmp_path)
    (out,) = check_graph(graph, protos, [q, k, v, q_pos], {"BatchMatMulV2", "SoftmaxV2", "SelectV2"})
    reference = sparse_attention_reference(q.float(), k.float(), v.float(), q_pos, 3, 4, 0.35)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, rtol=tolerance, atol=tolerance)


def test_sparse_attention_mla_decode(torchair, protos, tmp_path):
    g = torch.Generator().manual_seed(2)
    q, kv = torch.randn(2, 4, 1, 12, generator=g), torch.randn(2, 17, 12, generator=g)
    q_pos = torch.tensor([[16], [9]])

    def fn(q, kv, q_pos):
        return torch.ops.omni.sparse_attention_mla_decode(q, kv, q_pos, 2, 5, 0.3, 8)

    eager, graph = ge_graph_of(torchair, fn, [q, kv, q_pos], tmp_path)
    (out,) = check_graph(graph, protos, [q, kv, q_pos], {"Slice", "BatchMatMulV2"})
    torch.testing.assert_close(out, torch.ops.omni.sparse_attention_mla_decode(q, kv, q_pos, 2, 5, 0.3, 8),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [(0, -1), (3, 5)], ids=["dense", "sink3+recent5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_attention(torchair, protos, tmp_path, window, dtype):
    from kernels.latent_attention import latent_attention_reference

    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 1, 20, generator=g).to(dtype)             # R 16 + Dr 4, decode
    kv_c, k_pe = torch.randn(2, 15, 16, generator=g).to(dtype), torch.randn(2, 15, 4, generator=g).to(dtype)
    q_pos = torch.tensor([[14], [9]])  # the second sequence's cache tail (10..14) is not visible
    sink, recent = window

    def fn(q, kv_c, k_pe, q_pos):
        return torch.ops.omni.latent_attention(q, kv_c, k_pe, q_pos, 0.25, sink, recent)

    eager, graph = ge_graph_of(torchair, fn, [q, kv_c, k_pe, q_pos], tmp_path)
    (out,) = check_graph(graph, protos, [q, kv_c, k_pe, q_pos], {"ConcatV2", "BatchMatMulV2", "SoftmaxV2"})
    reference = latent_attention_reference(q.float(), kv_c.float(), k_pe.float(), q_pos, 0.25, sink, recent)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference.float(), rtol=tolerance, atol=tolerance)


def test_mask_positions_and_its_check(torchair, protos, tmp_path):
    causal = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 3, 7, 7).clone()

    def fn(allowed):
        return torch.ops.omni.mask_positions(allowed, True, "test")

    eager, graph = ge_graph_of(torchair, fn, [causal], tmp_path)
    (out,) = check_graph(graph, protos, [causal], {"Assert", "ReduceAll"})
    assert torch.equal(out, torch.arange(7).expand(2, 7))
    padded = causal.clone()
    padded[1, :, :, 0] = False  # left padding: row p allows [1, p], not [0, p]
    with pytest.raises(AssertionError, match="GE Assert failed"):
        GEEmulator(graph, protos).run([padded])


# -- omni-passes inspect --backend torchair ----------------------------------------------------

@pytest.mark.slow  # a whole-model compile
def test_inspect_writes_the_ge_graph_and_says_cann_did_not_compile_it(torchair, protos, tmp_path, capsys):
    import json

    from omni_passes.cli import main

    out = tmp_path / "inspect"
    code = main(["inspect", "--model-config", "tiny", "--passes", "redundant_experts", "--backend", "torchair",
                 "--out", str(out), "--check", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert result["check"]["ok"] and result["check"]["max_abs_diff"] <= 1e-5
    ge = result["ge_graph"]
    assert ge["compiled_by_cann"] is False and "CANN did not compile it" in captured.err
    (dump,) = ge["files"]
    counts = op_counts(load_graph(dump))
    assert counts.get("Cummax") == 3 and counts.get("GroupedMatmul") == 6
    assert json.loads((out / "report.json").read_text())["ge_graph"]["files"] == [dump]


def test_inspect_without_torchair_prints_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMNI_ASCEND_SOURCES=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, "-m", "omni_passes.cli", "inspect", "--model-config", "tiny",
                           "--passes", "redundant_experts", "--backend", "torchair", "--out", str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("omni-passes inspect:")]
    assert proc.returncode == 2 and len(lines) == 1 and "torchair is not available here" in lines[0]
    assert "make install" in lines[0] and not (tmp_path / "o").exists()
