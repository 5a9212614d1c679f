"""The dispatch pass on every MoE family the CLI takes: DeepSeek-V3, DeepSeek-V2, Qwen3-MoE,
Mixtral and GPT-OSS, each with identity, redundant, permuted and permuted-redundant placements.

Each case compiles the model with the pass and compares its logits with the eager model's
(fp32, exact up to rounding); every MoE layer must be matched. With redundant slots the test
then zeroes the replica slots in place: the output must change, so the replicas are really read.
"""

import pytest
import torch

import omni_passes
from omni_passes.model_info import MoEModelInfo, attention_refusals, dispatch_refusal, experts_modules, moe_layer_ids
from omni_passes.models import TINY_CONFIGS, build_model, load_hf_config
from omni_passes.placement.placement import Placement

ATOL = 1e-5
ARCHITECTURES = ["tiny", "tiny-deepseek-v2", "tiny-qwen3-moe", "tiny-mixtral", "tiny-gpt-oss"]
# Layers per model (compile time grows with them; 2 cores) and the decoder layers that are
# MoE then: DeepSeek's first layer and Qwen's mlp_only_layers=[0] are dense, and GPT-OSS
# alternates sliding-window and full attention.
LAYERS = {"tiny": 2, "tiny-deepseek-v2": 2, "tiny-qwen3-moe": 3, "tiny-mixtral": 2, "tiny-gpt-oss": 2}
EXPECTED_MOE = {"tiny": [1], "tiny-deepseek-v2": [1], "tiny-qwen3-moe": [1, 2],
                "tiny-mixtral": [0, 1], "tiny-gpt-oss": [0, 1]}


def placement(kind: str, layers: int, experts: int) -> Placement | None:
    generator = torch.Generator().manual_seed(11)
    rows = []
    for _ in range(layers):
        if kind == "identity":
            return None
        if kind == "redundant":          # every expert twice: any expert hit twice uses its replica
            row = torch.arange(experts).repeat(2)
        elif kind == "permuted":         # no extra slots, experts in another order
            row = torch.randperm(experts, generator=generator)
        elif kind == "permuted-redundant":
            row = torch.cat([torch.arange(experts), torch.arange(experts // 2)])
            row = row[torch.randperm(row.numel(), generator=generator)]
        rows.append(row)
    phy2log = torch.stack(rows)
    return Placement(num_layers=layers, num_logical_experts=experts, num_ranks=1, num_nodes=1,
                     slots_per_rank=phy2log.shape[1], phy2log=phy2log)


@pytest.fixture(scope="module")
def inputs():
    return torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("kind", ["identity", "redundant", "permuted", "permuted-redundant"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dispatch_exact_on_every_moe_layer(arch, kind, inputs):
    config = load_hf_config(arch, layers=LAYERS[arch])
    model = build_model(config, seed=0)
    info = MoEModelInfo.from_hf_config(config)
    assert list(info.moe_layer_ids) == EXPECTED_MOE[arch] == sorted(experts_modules(model))
    with torch.no_grad():
        reference = model(inputs).logits
    torch._dynamo.reset()
    chosen = placement(kind, len(info.moe_layer_ids), info.num_experts)
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]}, placement=chosen)
    with torch.no_grad():
        out = compiled(inputs).logits
    report = compiled.omni.report()["passes"]["redundant_experts"]
    assert report["matched_layers"] == EXPECTED_MOE[arch]
    assert report["skipped"] == []
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
    load = compiled.omni.controller.expert_load
    assert load.sum(dim=1).tolist() == [inputs.numel() * info.top_k] * len(info.moe_layer_ids)
    if chosen is not None and chosen.num_slots > chosen.num_logical_experts:
        _zero_replicas(compiled.omni.controller.weights, chosen)
        with torch.no_grad():
            sabotaged = compiled(inputs).logits
        assert (sabotaged - reference).abs().max() > 1e-3, "replica slots were never read"


def _zero_replicas(experts, chosen: Placement) -> None:
    """Zero every storage row that holds a second or later copy of its expert, in place (rows
    E.. in the placement controller's layout; rows < E are the experts themselves)."""
    for tensors in experts.storage:
        for tensor in tensors.values():
            with torch.no_grad():
                tensor.data[chosen.num_logical_experts:] = 0


def test_gpt_oss_redundant_slots_include_expert_biases():
    config = load_hf_config("tiny-gpt-oss", layers=2)
    model = build_model(config)
    chosen = placement("redundant", 2, 8)
    omni_passes.compile(model, {"passes": ["redundant_experts"]}, placement=chosen)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj_bias.shape[0] == experts.down_proj_bias.shape[0] == chosen.num_slots == 16
    assert torch.equal(experts.down_proj_bias[8:], experts.down_proj_bias[:8])  # slot 8 + e holds expert e


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_moe_layers_from_config_match_the_built_model(arch):
    config = load_hf_config(arch)
    model = build_model(config)
    assert moe_layer_ids(config) == tuple(sorted(experts_modules(model)))
    assert dispatch_refusal(model) is None


def test_qwen_mlp_only_layers_and_sparse_step():
    config = load_hf_config("tiny-qwen3-moe", overrides={"mlp_only_layers": [2], "decoder_sparse_step": 2})
    model = build_model(config)
    assert moe_layer_ids(config) == (1, 3) == tuple(sorted(experts_modules(model)))


def test_dispatch_refuses_a_model_whose_config_and_layers_disagree():
    config = load_hf_config("tiny-qwen3-moe")
    model = build_model(config)
    model.config.mlp_only_layers = [1]      # the config now says layer 1 is dense; the model has experts there
    reason = dispatch_refusal(model)
    assert reason is not None and "say MoE layers [0, 2, 3]" in reason and "experts in layers [1, 2, 3]" in reason


def test_sparse_attention_refusals_per_layer():
    gpt_oss = build_model(load_hf_config("tiny-gpt-oss"))
    refused = attention_refusals(gpt_oss, [0, 1, 2, 3])
    assert sorted(refused) == [0, 1, 2, 3]
    assert all("sink logits" in reason for reason in refused.values())
    assert "sliding-window attention (window 8)" in refused[0] and "sliding" not in refused[1]
    mixtral = build_model(load_hf_config("tiny-mixtral", overrides={"sliding_window": 6}))
    assert set(attention_refusals(mixtral, [0, 2])) == {0, 2}
    for arch in ("tiny", "tiny-deepseek-v2", "tiny-qwen3-moe", "tiny-mixtral"):
        assert attention_refusals(build_model(load_hf_config(arch)), [0, 1, 2, 3]) == {}, arch


@pytest.mark.parametrize("arch", ["tiny-qwen3-moe", "tiny-mixtral"])
def test_sparse_attention_on_gqa_sdpa_equals_masked_reference(arch):
    """Non-MLA attention (GQA through SDPA) is rewritten, and equals the masked reference."""
    from omni_passes.kvcache.attention import masked_reference

    model = build_model(load_hf_config(arch, layers=3))
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), masked_reference(model, 2, 4, [0, 2]):
        reference = model(tokens).logits
    with torch.no_grad():
        dense = model(tokens).logits
    torch._dynamo.reset()
    compiled = omni_passes.compile(model, {"passes": ["sparse_attention"],
                                           "sparse_attention": {"sink": 2, "recent": 4, "pattern": [0, 2]}})
    with torch.no_grad():
        out = compiled(tokens).logits
    assert compiled.omni.report()["passes"]["sparse_attention"]["matched_layers"] == [0, 2]
    assert (dense - reference).abs().max() > 1e-3            # the mask matters at this length
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)


def test_tiny_names_are_all_tested():
    assert sorted(TINY_CONFIGS) == sorted(ARCHITECTURES)


JETMOE = {"model_type": "jetmoe", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
          "num_key_value_heads": 2, "kv_channels": 16, "intermediate_size": 64, "num_local_experts": 4,
          "num_experts_per_tok": 2, "max_position_embeddings": 256}


def test_dispatch_refuses_experts_outside_the_experts_interface(tmp_path):
    """JetMoE runs its experts as its own per-expert loop: nothing to dispatch into."""
    import json

    path = tmp_path / "config.json"
    path.write_text(json.dumps(JETMOE))
    model = build_model(load_hf_config(str(path)))
    reason = dispatch_refusal(model)
    assert reason is not None and reason.startswith("JetMoeForCausalLM: its experts are not stacked")


def test_compile_refuses_what_the_checks_refuse(tmp_path):
    """``omni_passes.compile`` itself refuses, naming the layer or the model, before tracing:
    sink+recent on GPT-OSS's sliding-window layer, the dispatch pass on JetMoE's expert loop."""
    import json

    from omni_passes.config import ConfigError
    from omni_passes.placement.placement import PlacementError

    gpt_oss = build_model(load_hf_config("tiny-gpt-oss", layers=2))
    with pytest.raises(ConfigError, match=r"layer 0: .*sliding-window attention \(window 8\)"):
        omni_passes.compile(gpt_oss, {"passes": ["sparse_attention"],
                                      "sparse_attention": {"sink": 2, "recent": 4, "pattern": [0]}})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(JETMOE))
    jetmoe = build_model(load_hf_config(str(path)))
    with pytest.raises(PlacementError, match="redundant_experts cannot rewrite this model: JetMoeForCausalLM"):
        omni_passes.compile(jetmoe, {"passes": ["redundant_experts"]})
