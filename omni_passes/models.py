"""Build transformers DeepSeek models with random weights from a config (no downloads).

``tiny`` is a DeepSeek-V3 small enough to compile in seconds on 2 CPU cores but with every
structural feature the passes care about: dense first layer, MoE layers with grouped top-k
routing (n_group > 1), a shared expert, MLA attention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY_V3: dict[str, Any] = dict(
    model_type="deepseek_v3",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=2048,
)


class ModelConfigError(ValueError):
    """A model config that cannot be built; names the file and the problem."""


def load_hf_config(model_config: str, layers: int | None = None, overrides: dict | None = None):
    """``tiny`` or a path to a config.json (or a directory holding one) → transformers config.
    For ``tiny``, ``overrides`` go into the constructor (derived sizes such as the rotary
    dimension follow them); for files they are set on the loaded config."""
    from transformers import AutoConfig, DeepseekV3Config

    if model_config == "tiny":
        values = {**TINY_V3, **(overrides or {})}
        values.pop("model_type")
        if layers is not None:
            values["num_hidden_layers"] = layers
        config = DeepseekV3Config(**values)
        overrides = None
    else:
        path = Path(model_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ModelConfigError(f"model config {model_config}: no such file (give 'tiny' or a config.json path)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"model config {path}: malformed JSON: {exc}") from None
        model_type = data.get("model_type")
        if model_type not in ("deepseek_v3", "deepseek_v2"):
            raise ModelConfigError(f"model config {path}: model_type {model_type!r} is not deepseek_v3 or deepseek_v2")
        data.pop("auto_map", None)  # remote-code configs: use transformers' own classes
        data.pop("quantization_config", None)  # random weights: build unquantised
        config = AutoConfig.for_model(**data)
    if layers is not None:
        if layers < 1:
            raise ModelConfigError(f"--layers must be >= 1, got {layers}")
        config.num_hidden_layers = layers
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    # Grouped GEMM experts: the form that compiles to one graph (fullgraph) with aten
    # grouped_mm; the default loop-over-experts form is data-dependent.
    config._experts_implementation = "grouped_mm"
    config._attn_implementation = "sdpa"
    return config


def build_model(config, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """A causal-LM with random (seeded) weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    _randomise_router_bias(model)
    return model


def _randomise_router_bias(model: torch.nn.Module) -> None:
    """transformers initialises e_score_correction_bias to zeros; small random values make
    the biased and unbiased scores differ, as in a trained model, so tests see both paths."""
    generator = torch.Generator().manual_seed(1234)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.rand(buffer.shape, generator=generator).to(buffer) * 0.1)
