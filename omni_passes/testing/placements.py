"""Placements and small models for tests (CPU and CUDA test files share them)."""

from __future__ import annotations

import torch

from omni_passes.placement.placement import Placement

# A DeepSeek-V2 of the tiny V3's size (softmax scores, group-limited greedy routing, top-k
# values as weights), for the transformers V2 code path.
TINY_V2 = dict(
    model_type="deepseek_v2", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, topk_method="group_limited_greedy",
    n_shared_experts=1, routed_scaling_factor=1.0, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
    qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=2048, norm_topk_prob=False,
)
MODEL_KINDS = ("v3-ngroup4", "v3-ngroup1", "v2")


def tiny_config(kind: str, tmp_dir=None):
    """transformers config of a tiny DeepSeek: ``v3-ngroup4``, ``v3-ngroup1`` or ``v2``."""
    import json
    import tempfile
    from pathlib import Path

    from omni_passes.models import load_hf_config

    if kind == "v2":
        path = Path(tmp_dir or tempfile.mkdtemp(prefix="omni-v2-")) / "config.json"
        path.write_text(json.dumps(TINY_V2))
        return load_hf_config(str(path))
    n_group = {"v3-ngroup4": 4, "v3-ngroup1": 1}[kind]
    return load_hf_config("tiny", overrides={"n_group": n_group, "topk_group": 2 if n_group > 1 else 1})


def placement(rows: torch.Tensor | list, experts: int, ranks: int = 1) -> Placement:
    rows = torch.as_tensor(rows, dtype=torch.int64)
    return Placement(num_layers=rows.shape[0], num_logical_experts=experts, num_ranks=ranks, num_nodes=1,
                     slots_per_rank=rows.shape[1] // ranks, phy2log=rows)


def permuted(layers: int, experts: int, generator: torch.Generator, ranks: int = 1) -> Placement:
    """Every layer a random permutation of the experts (no redundant slots)."""
    return placement(torch.stack([torch.randperm(experts, generator=generator) for _ in range(layers)]), experts, ranks)


def reversed_placement(layers: int, experts: int) -> Placement:
    return placement(torch.arange(experts).flip(0).repeat(layers, 1), experts)


def redundant_permuted(layers: int, experts: int, extra: int, generator: torch.Generator, ranks: int = 1,
                       hot: torch.Tensor | None = None) -> Placement:
    """Every expert once plus ``extra`` replicas (of ``hot[l]`` experts if given, else random),
    all slots shuffled."""
    rows = []
    for layer in range(layers):
        replicas = (hot[layer][:extra] if hot is not None else torch.randint(0, experts, (extra,), generator=generator))
        row = torch.cat([torch.arange(experts), replicas])
        rows.append(row[torch.randperm(row.numel(), generator=generator)])
    return placement(torch.stack(rows), experts, ranks)
