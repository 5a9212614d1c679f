"""Exactness of the dispatch pass on CUDA (run on the GPU machine; skipped without CUDA)."""

import pytest
import torch

import omni_passes
from omni_passes.models import build_model, load_hf_config
from omni_passes.placement.placement import Placement

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def replicated(num_layers: int, experts: int, extra: int, generator: torch.Generator) -> Placement:
    rows = [torch.cat([torch.arange(experts), torch.randint(0, experts, (extra,), generator=generator)]) for _ in range(num_layers)]
    phy2log = torch.stack(rows)
    return Placement(num_layers=num_layers, num_logical_experts=experts, num_ranks=1, num_nodes=1,
                     slots_per_rank=experts + extra, phy2log=phy2log)


# Reference: the same weights compiled without passes. (bf16 eager vs compiled may round
# hidden states differently and flip a near-tie routing decision; that is not the pass.)
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("n_group", [4, 1])
@pytest.mark.parametrize("extra", [0, 12])
def test_compiled_with_pass_equals_eager_on_cuda(dtype, atol, n_group, extra):
    config = load_hf_config("tiny", overrides={"n_group": n_group, "topk_group": 2 if n_group > 1 else 1})
    model = build_model(config, dtype=dtype, device="cuda")
    inputs = torch.randint(0, config.vocab_size, (4, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    plain = omni_passes.compile(build_model(config, dtype=dtype, device="cuda"), {"passes": []})
    with torch.no_grad():
        reference = plain(inputs).logits.float()
    placement = replicated(3, 16, extra, torch.Generator().manual_seed(1)) if extra else None
    torch._dynamo.reset()
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]}, placement=placement)
    with torch.no_grad():
        out = compiled(inputs).logits.float()
    report = compiled.omni.report()["passes"]["redundant_experts"]
    assert report["matched_layers"] == [1, 2, 3]
    diff = (out - reference).abs().max().item()
    print(f"dtype={dtype} n_group={n_group} extra_slots={extra}: max abs diff {diff:.3g}")
    assert diff <= atol
    load = compiled.omni.placement_state.expert_load
    assert load.device.type == "cuda"
    assert load.sum(dim=1).tolist() == [inputs.numel() * 4] * 3
