"""Every GE op our converters emit, checked against torchair's shipped IR prototypes; and the GE
graphs they build, run by an EMULATOR against the PyTorch references.

STAND-IN, stated plainly: torchair is torch-npu 2.13.0's real Python (unpacked by ``make
install``) except its native extension ``torchair.core._torchair`` (CANN's Graph Engine), which
``omni_passes/testing/torchair_native_standin.py`` replaces; the GE graphs here are built and
dumped by torchair's real converter pipeline, never compiled by CANN.

EMULATION, stated plainly: ``omni_passes/testing/ge_emulator.py`` runs a dumped GE graph with
torch implementations of the IR ops (this project's reading of their documented semantics). It
checks the arithmetic each converter's graph describes and gives each edge a concrete dtype for
the prototype check; it is not CANN, and says nothing of CANN kernel support or NPU numerics.

Each case compiles a small function calling one op through ``torchair.get_npu_backend`` (no
omni pass involved: the converter alone), dumps the GE graph, and checks: every op against its
prototype (names, arity, attributes), the emulated outputs against the op's reference, and
every emulated dtype against the prototype's accepted dtypes.
"""

from __future__ import annotations

import glob

import pytest
import torch

from omni_passes.testing.ascend import import_torchair
from omni_passes.testing.ge_emulator import GEEmulator
from omni_passes.testing.ge_ir import PLUMBING, check_dtypes, check_op, load_graph, load_prototypes

pytestmark = pytest.mark.torchair


@pytest.fixture(scope="module")
def torchair():
    module, info = import_torchair()
    assert info.native == "stand-in"
    from omni_passes.torchair_backend import register_converters

    register_converters()
    return module


@pytest.fixture(scope="module")
def protos(torchair):
    return load_prototypes()


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
    from omni_passes.placement.runtime import ExpertPlacementState

    experts = 8
    if kind == "identity":
        phy2log = torch.arange(experts).repeat(2, 1)
    elif kind == "permuted":
        phy2log = torch.stack([torch.randperm(experts, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    else:  # redundant: experts 0 and 5 get 3 and 2 replicas
        phy2log = torch.stack([torch.cat([torch.arange(experts), torch.tensor([0, 0, 5])])] * 2)
    placement = Placement(num_layers=2, num_logical_experts=experts, num_ranks=1, num_nodes=1,
                          slots_per_rank=phy2log.shape[1], phy2log=phy2log)
    return ExpertPlacementState(placement)


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
    scatter = "TensorScatterAdd" if accumulate else "TensorScatterUpdate"
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
