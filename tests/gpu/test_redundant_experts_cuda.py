"""The dispatch pass on CUDA (run on the GPU machine; skipped without CUDA): every placement
exact (reversed, random, redundant + permuted, a chain of in-place re-placements) on
transformers DeepSeek-V3 (n_group 4 and 1) and V2 in fp32 and bf16; loads counted inside
CUDA-graph replays (the count gate is a tensor); the lowered ops equal the eager kernels."""

import pytest
import torch

import omni_passes
from omni_passes.models import build_model
from omni_passes.testing.placements import MODEL_KINDS, permuted, redundant_permuted, reversed_placement, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

E, MOE_LAYERS, TOP_K = 16, 3, 4
# fp32: against eager. bf16: against the same weights compiled without passes (eager and
# compiled bf16 round hidden states differently and can flip a near-tie routing decision).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def inputs_for(config):
    return torch.randint(0, config.vocab_size, (4, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(0))


def reference(config, dtype, inputs):
    model = build_model(config, dtype=dtype, device="cuda")
    if dtype == torch.bfloat16:
        model = omni_passes.compile(model, {"passes": []})
    with torch.no_grad():
        return model(inputs).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_every_placement_exact_on_cuda(kind, dtype):
    config = tiny_config(kind)
    inputs = inputs_for(config)
    expected = reference(config, dtype, inputs)
    g = torch.Generator().manual_seed(3)
    results = {}
    for name, start, chain in (
        ("permutations", reversed_placement(MOE_LAYERS, E), [permuted(MOE_LAYERS, E, g), permuted(MOE_LAYERS, E, g)]),
        ("redundant", redundant_permuted(MOE_LAYERS, E, 12, g, ranks=4),
         [redundant_permuted(MOE_LAYERS, E, 12, g, ranks=4) for _ in range(2)]),
    ):
        torch._dynamo.reset()
        compiled = omni_passes.compile(build_model(config, dtype=dtype, device="cuda"), {"passes": ["redundant_experts"]},
                                       placement=start)
        diffs = []
        for step, p in enumerate([start, *chain]):
            if step:
                compiled.omni.apply_placement(p)
            with torch.no_grad():
                diffs.append((compiled(inputs).logits.float() - expected).abs().max().item())
        assert compiled.omni.report()["passes"]["redundant_experts"]["matched_layers"] == [1, 2, 3]
        controller = compiled.omni.controller
        assert controller.expert_load.device.type == "cuda"
        assert controller.total_expert_load().sum(1).tolist() == [3 * inputs.numel() * TOP_K] * MOE_LAYERS
        assert controller.total_slot_load().sum(1).tolist() == [3 * inputs.numel() * TOP_K] * MOE_LAYERS
        results[name] = diffs
    print(f"{kind} {dtype}: max abs diff per placement {results}")
    assert max(max(d) for d in results.values()) <= TOLERANCE[dtype]


def test_cuda_graph_replays_count_every_token_and_follow_in_place_placements():
    """Capture one compiled forward in a CUDA graph; each replay counts its tokens (tensor-side
    gate), gate 0 replays count nothing, and a placement applied in place between replays is
    read by the replays (same tensors), still exact. bf16: transformers' fp32 grouped-GEMM
    fallback reads offsets on the host and cannot be captured."""
    config = tiny_config("v3-ngroup4")
    inputs = inputs_for(config)
    expected = reference(config, torch.bfloat16, inputs)
    g = torch.Generator().manual_seed(8)
    torch._dynamo.reset()
    compiled = omni_passes.compile(build_model(config, dtype=torch.bfloat16, device="cuda"), {"passes": ["redundant_experts"]},
                                   placement=redundant_permuted(MOE_LAYERS, E, 8, g, ranks=4))
    controller = compiled.omni.controller
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            compiled(inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    controller.take_load()
    per_forward = None
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = compiled(inputs).logits
    controller.take_load()  # capture does not run kernels, but start from zero anyway
    graph.replay()
    torch.cuda.synchronize()
    per_forward = controller.take_load()
    assert per_forward.sum(1).tolist() == [inputs.numel() * TOP_K] * MOE_LAYERS
    for _ in range(5):
        graph.replay()
    controller.gate.zero_()
    for _ in range(3):
        graph.replay()
    controller.gate.fill_(1)
    torch.cuda.synchronize()
    assert torch.equal(controller.take_load(), 5 * per_forward)
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[torch.bfloat16], rtol=0)
    slots_before = controller.total_slot_load()
    copied = compiled.omni.apply_placement(redundant_permuted(MOE_LAYERS, E, 8, g, ranks=4))
    graph.replay()
    torch.cuda.synchronize()
    assert copied > 0
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[torch.bfloat16], rtol=0)
    step_slots = controller.total_slot_load() - slots_before
    per_expert = torch.zeros_like(per_forward).scatter_add_(1, controller.placement.phy2log, step_slots)
    assert torch.equal(per_expert, controller.take_load())


@pytest.mark.parametrize("tokens, dynamic", [(16, False), (300, False), (77, True)])
def test_lowered_ops_equal_the_eager_kernels_on_cuda(tokens, dynamic, monkeypatch):
    from kernels import inductor_lowerings
    from kernels.expert_dispatch import expert_dispatch_reference
    from omni_passes.placement.controller import PlacementController
    from omni_passes.testing.placements import placement

    inductor_lowerings.register()
    monkeypatch.setenv(inductor_lowerings.ENV, "1")
    # A raw torch.compile keeps Inductor's FX graph cache on; a hit from an earlier process
    # would bring back pickled copies of the state's tensors (omni_passes.compile turns it off).
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    g = torch.Generator().manual_seed(tokens)
    rows = torch.stack([torch.cat([torch.arange(E), torch.randint(0, E, (9,), generator=g)])[torch.randperm(E + 9, generator=g)]
                        for _ in range(2)])
    state = PlacementController(placement(rows, E), device="cuda", layout="slot")

    def route(ids):
        torch.ops.omni.record_expert_load(ids, state.handle, 1)
        return torch.ops.omni.expert_dispatch(ids, state.handle, 1) + 0

    torch._dynamo.reset()
    compiled = torch.compile(route, fullgraph=True)
    ids = torch.randint(0, E, (tokens, 8), generator=g).cuda()
    if dynamic:
        torch._dynamo.mark_dynamic(ids, 0)
    out = compiled(ids)
    assert torch.equal(out, expert_dispatch_reference(ids, state.replica_slots, state.replica_count, 1))
    assert torch.equal(state.expert_load[1], torch.bincount(ids.flatten(), minlength=E))
    assert torch.equal(state.row_load[1], torch.bincount(out.flatten(), minlength=E + 9))
    state.close()
