"""The check rule (omni_passes.numerics): in bf16 an exact rewrite is ok and a wrong one is not,
although compile alone moves bf16 logits; the rule's arithmetic on hand-made tensors."""

import pytest
import torch

import omni_passes
from omni_passes.models import build_model, load_hf_config
from omni_passes.numerics import RELATIVE_EPS, check_rewrite, max_abs_diff
from omni_passes.placement.layout import RowLayout
from omni_passes.placement.placement import Placement


def doubled(experts: int, layers: int, replica_order: torch.Tensor) -> Placement:
    phy2log = torch.cat([torch.arange(experts), replica_order]).repeat(layers, 1)
    return Placement(num_layers=layers, num_logical_experts=experts, num_ranks=1, num_nodes=1,
                     slots_per_rank=2 * experts, phy2log=phy2log)


@pytest.mark.parametrize("arch", ["tiny", "tiny-qwen3-moe"])
def test_bf16_check_ok_for_exact_rewrite_and_not_ok_for_corrupted_table(arch):
    config = load_hf_config(arch, layers=3)
    model = build_model(config, dtype=torch.bfloat16, seed=1)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    experts = config.n_routed_experts if arch == "tiny" else config.num_experts
    layers = 2
    with torch.no_grad():
        eager = model(tokens).logits
        torch._dynamo.reset()
        plain = omni_passes.compile(model, {"passes": []})(tokens).logits
        torch._dynamo.reset()
        compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]},
                                       placement=doubled(experts, layers, torch.arange(experts)))
        rewritten = compiled(tokens).logits
        exact = check_rewrite(rewritten, plain, eager, torch.bfloat16)
        # Corrupt the tables behind the controller's back: they now say storage row E + e holds
        # expert e + 1, while it still holds e (the controller itself would have moved the slot
        # to the row that holds e + 1, or copied the row).
        bad = doubled(experts, layers, torch.arange(experts).roll(-1))
        lying = RowLayout(slot_row=torch.arange(2 * experts).repeat(layers, 1), row_expert=bad.phy2log.clone())
        compiled.omni.controller._write_tables(bad, lying)
        corrupted = check_rewrite(compiled(tokens).logits, plain, eager, torch.bfloat16)
    assert exact["ok"] is True, exact
    assert exact["pass_error"] <= exact["tolerance"]
    assert corrupted["ok"] is False, corrupted
    assert corrupted["pass_error"] > corrupted["tolerance"] > 0
    assert exact["compile_noise"] == corrupted["compile_noise"]


def test_rule_arithmetic():
    eager = torch.tensor([1.0, -2.0, 4.0])
    compiled = eager + torch.tensor([0.0, 0.01, 0.0])
    result = check_rewrite(compiled + torch.tensor([0.0, 0.0, 0.02]), compiled, eager, torch.bfloat16)
    assert result["compile_noise"] == pytest.approx(0.01, abs=1e-6)
    assert result["output_scale"] == 4.0
    assert result["tolerance"] == pytest.approx(0.01 + RELATIVE_EPS[torch.bfloat16] * 4.0, abs=1e-6)
    assert result["ok"] is True and result["max_abs_diff"] == result["pass_error"]
    result = check_rewrite(compiled + torch.tensor([0.0, 0.0, 0.05]), compiled, eager, torch.bfloat16)
    assert result["ok"] is False
    # fp32: no compile noise, one unit of 1e-5 at scale 4
    result = check_rewrite(eager + 3e-5, eager, eager, torch.float32)
    assert result["tolerance"] == pytest.approx(4e-5) and result["ok"] is True
    assert check_rewrite(eager + 5e-5, eager, eager, torch.float32)["ok"] is False


def test_nan_and_shape_mismatches_are_never_ok():
    eager = torch.ones(3)
    assert check_rewrite(torch.tensor([1.0, float("nan"), 1.0]), eager, eager, torch.float32)["ok"] is False
    assert check_rewrite(torch.ones(4), eager, eager, torch.float32)["ok"] is False
    assert max_abs_diff(torch.tensor([float("nan")]), torch.tensor([float("nan")])) == 0.0
    assert max_abs_diff(torch.tensor([float("inf")]), torch.tensor([1.0])) == float("inf")
    with pytest.raises(ValueError, match="no rule for dtype"):
        check_rewrite(eager, eager, eager, torch.int64)
