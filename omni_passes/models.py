"""Build transformers MoE causal LMs with random weights from a config (no downloads).

``--model-config`` takes ``tiny`` (DeepSeek-V3), one of the other ``tiny-*`` names below, or
any transformers MoE causal-LM ``config.json`` (DeepSeek-V2/V3, Qwen2/3-MoE, Mixtral,
GPT-OSS, GLM-4-MoE, ...). Every tiny model compiles in seconds on 2 CPU cores and keeps the
structure the passes care about: ``tiny`` has a dense first layer, grouped top-k routing
(n_group > 1), a shared expert and MLA attention; ``tiny-qwen3-moe`` a dense layer among MoE
layers (``mlp_only_layers``) and GQA; ``tiny-gpt-oss`` expert biases, attention sinks and
alternating sliding-window layers.

A config that cannot be built raises ``ModelConfigError`` with one line naming the file and
the field, never a traceback from deep inside transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from omni_passes.model_info import EXPERT_COUNT_FIELDS, num_routed_experts

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
_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": TINY_V3,
    "tiny-deepseek-v2": dict(
        TINY_V3, model_type="deepseek_v2", topk_method="group_limited_greedy", routed_scaling_factor=1.0,
        num_key_value_heads=4),
    "tiny-qwen3-moe": dict(
        _SMALL, model_type="qwen3_moe", head_dim=16, moe_intermediate_size=32, num_experts=16,
        num_experts_per_tok=4, norm_topk_prob=True, mlp_only_layers=[0]),
    "tiny-mixtral": dict(_SMALL, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2),
    "tiny-gpt-oss": dict(
        _SMALL, model_type="gpt_oss", head_dim=16, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
        # YaRN's implicit factor is max_position_embeddings / original (4096): keep them consistent
        max_position_embeddings=131072),
}
# Per-layer lists that must stay as long as num_hidden_layers when --layers changes it.
_PER_LAYER_LISTS = ("layer_types", "mlp_layer_types")


class ModelConfigError(ValueError):
    """A model config that cannot be built; one line naming the file and the problem."""


def load_hf_config(model_config: str, layers: int | None = None, overrides: dict | None = None):
    """A tiny name or a path to a config.json (or a directory holding one) → transformers
    config. ``overrides`` replace fields before the config is built (derived sizes follow)."""
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise ModelConfigError(f"--layers must be an integer >= 1, got {layers!r}")
    if model_config in TINY_CONFIGS:
        source, data = model_config, dict(TINY_CONFIGS[model_config])
    else:
        source, data = _read_config_file(model_config)
        data.pop("auto_map", None)  # remote-code configs: use transformers' own classes
        data.pop("quantization_config", None)  # random weights: build unquantised
    data.update(overrides or {})
    if layers is not None:
        data["num_hidden_layers"] = layers
        for key in _PER_LAYER_LISTS:
            if isinstance(data.get(key), list):
                data[key] = (data[key] * layers)[:layers] if data[key] else data[key]
    config = _build_config(source, data)
    check_moe_config(config, source)
    model_class = causal_lm_class(config)
    # Grouped GEMM experts: the form that compiles to one graph (fullgraph) with aten
    # grouped_mm; the default loop-over-experts form is data-dependent. Models without
    # transformers' experts interface are built as they are (the dispatch pass refuses them).
    can_set = getattr(model_class, "_can_set_experts_implementation", None)
    if can_set is None or can_set():
        config._experts_implementation = "grouped_mm"
    # SDPA where the model supports it (the form the sparse-attention pass matches), else eager.
    config._attn_implementation = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
    return config


def causal_lm_class(config) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def _read_config_file(model_config: str) -> tuple[str, dict]:
    path = Path(model_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        names = ", ".join(TINY_CONFIGS)
        raise ModelConfigError(f"model config {model_config}: no such file (give a config.json path or one of {names})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"model config {path}: malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"model config {path}: expected a JSON object, got {type(data).__name__}")
    return str(path), data


def _build_config(source: str, data: dict):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ModelConfigError(f"model config {source}: field 'model_type' missing or not a string (got {model_type!r})")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelConfigError(f"model config {source}: field 'model_type' is {model_type!r}, which is not a "
                               "transformers causal-LM model type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # transformers' own validation: one line, not its traceback
        raise ModelConfigError(f"model config {source}: {_field_error(exc)}") from None


def _field_error(exc: BaseException) -> str:
    """transformers' "Validation error for field 'X':\n  TypeError: Field 'X' expected int, ..."
    as "field 'X' expected int, ..."; other errors as one line."""
    match = re.match(r"Validation error for field '([^']+)'", str(exc))
    if match:
        detail = str(exc).strip().splitlines()[-1].strip()
        detail = re.sub(rf"^\w+: Field '{re.escape(match.group(1))}'\s*", "", detail)
        return f"field '{match.group(1)}' {detail}"
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return ": ".join(lines) or type(exc).__name__


def _field(config, name: str):
    return getattr(config, name, None)


def check_moe_config(config, source: str) -> None:
    """The structural facts a MoE model needs, each checked against the field that states it."""
    def bad(field: str, why: str) -> ModelConfigError:
        return ModelConfigError(f"model config {source}: field '{field}' {why}")

    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size",
                 "num_experts_per_tok", *EXPERT_COUNT_FIELDS, "n_group", "topk_group"):
        value = _field(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise bad(name, f"must be an integer >= 1, got {value!r}")
    experts = num_routed_experts(config)
    if experts == 0:
        raise ModelConfigError(f"model config {source}: {config.model_type} has no routed experts (none of "
                               f"{', '.join(EXPERT_COUNT_FIELDS)} is set): not a MoE model")
    top_k = _field(config, "num_experts_per_tok")
    if top_k is not None and top_k > experts:
        raise bad("num_experts_per_tok", f"is {top_k}, more than the {experts} routed experts")
    heads, kv_heads = config.num_attention_heads, _field(config, "num_key_value_heads")
    if kv_heads is not None and heads % kv_heads:
        raise bad("num_key_value_heads", f"is {kv_heads}, which does not divide num_attention_heads {heads}")
    if _field(config, "head_dim") is None and _field(config, "kv_lora_rank") is None and config.hidden_size % heads:
        raise bad("hidden_size", f"is {config.hidden_size}, not a multiple of num_attention_heads {heads} (and no head_dim)")
    grouped = config.model_type != "deepseek_v2" or _field(config, "topk_method") == "group_limited_greedy"
    n_group, topk_group = _field(config, "n_group"), _field(config, "topk_group")
    if grouped and n_group:
        if experts % n_group:
            raise bad("n_group", f"is {n_group}, which does not divide the {experts} routed experts")
        if topk_group is not None and topk_group > n_group:
            raise bad("topk_group", f"is {topk_group}, more than n_group {n_group}")
        if top_k is not None and topk_group is not None and top_k > topk_group * (experts // n_group):
            raise bad("num_experts_per_tok", f"is {top_k}, more than the {topk_group * (experts // n_group)} "
                      f"experts in the topk_group={topk_group} groups routing keeps")
    dense = _field(config, "first_k_dense_replace")
    if dense is not None and (isinstance(dense, bool) or not isinstance(dense, int) or dense < 0):
        raise bad("first_k_dense_replace", f"must be an integer >= 0, got {dense!r}")
    for key in _PER_LAYER_LISTS:
        value = _field(config, key)
        if isinstance(value, list) and len(value) != config.num_hidden_layers:
            raise bad(key, f"has {len(value)} entries for {config.num_hidden_layers} layers")


def build_model(config, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """A causal-LM with random (seeded) weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    model_class = causal_lm_class(config)
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, TypeError, RuntimeError, AttributeError, KeyError, IndexError) as exc:
        raise ModelConfigError(f"cannot build {model_class.__name__}: {_one_line(exc)}") from None
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
