"""The model a graph bench runs and the decode step it times.

``SHAPES``: DeepSeek-V2-Lite dimensions (64 routed experts, top-6, 2 shared, MLA without
q_lora) in the V3 architecture, and DeepSeek-V3 layer dimensions (256 experts, top-8,
n_group 8); ``tiny`` is ``omni_passes.models.TINY_V3``. Weights are random (seeded).
"""

from __future__ import annotations

from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},  # omni_passes.models.TINY_V3
    "v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, n_shared_experts=2,
        routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=163840,
    ),
    "v3-slice": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128,
        n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=163840,
    ),
}
DEFAULT_LAYERS = {"tiny": 2, "v2-lite": 4, "v3-slice": 2}


def model_config(shape: str, layers: int | None = None):
    """The transformers config of ``shape`` with ``layers`` decoder layers (default per shape)."""
    from omni_passes.models import load_hf_config

    layers = layers or DEFAULT_LAYERS[shape]
    if shape == "tiny":
        return load_hf_config("tiny", layers=layers)
    return load_hf_config("tiny", layers=layers, overrides=SHAPES[shape])


def pattern_layers(spec: str, num_layers: int) -> list[int]:
    """Layers to compress: 'half' (every other layer from 1) or a comma list of indices.
    Raises ValueError naming the bad entry."""
    if spec == "half":
        return list(range(1, num_layers, 2)) or [0]
    try:
        pattern = [int(i) for i in spec.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"--pattern must be 'half' or a comma list of layer indices, got {spec!r}") from None
    bad = [i for i in pattern if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"--pattern names layer(s) {bad}; the model has {num_layers} layers")
    return pattern


class DecodeSteps:
    """One decode step at the end of a static cache of ``context`` slots, on cache contents that
    every variant sees alike: random latent rows (seeded per context), not zeros, so numerics
    checks compare attention over real-looking data and timings do not run on zeros.

    transformers' static cache takes the step's position from its own write counter
    (``cumulative_length``, a device tensor each update advances), not from ``cache_position``:
    every step first sets that counter to ``context - 1``, so each (replayed) step writes the last
    slot and its query attends to all ``context`` keys. Without that, step n sat at position n:
    the mask allowed n + 1 keys, and replaying more steps than a short cache holds wrote past
    its end (the default CUDA invocation died with "index out of bounds: 0 <= tmp14 < 128").

    step_ids [B, 1] -> logits [B, 1, vocab].
    """

    def __init__(self, hf_config, step_ids: torch.Tensor, device: str, dtype: torch.dtype):
        self.hf_config, self.step_ids, self.device, self.dtype = hf_config, step_ids, device, dtype

    def cache(self, module, context: int):
        from transformers import StaticCache

        cache = StaticCache(config=self.hf_config, max_cache_len=context)
        eager = getattr(module, "_orig_mod", module)
        with torch.no_grad():  # transformers allocates a static cache on its first update: do it eagerly
            eager(input_ids=self.step_ids, past_key_values=cache, use_cache=True,
                  cache_position=torch.zeros(1, dtype=torch.long, device=self.device))
        generator = torch.Generator(device=self.device).manual_seed(context)
        for layer in getattr(cache, "layers", []):
            for tensor_name in ("keys", "values"):
                tensor = getattr(layer, tensor_name, None)
                if isinstance(tensor, torch.Tensor):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator, device=self.device, dtype=torch.float32))
        return cache

    def run(self, module, cache, context: int) -> torch.Tensor:
        position = torch.full((1,), context - 1, dtype=torch.long, device=self.device)
        for layer in getattr(cache, "layers", []):
            counter = getattr(layer, "cumulative_length", None)
            if isinstance(counter, torch.Tensor):
                counter.fill_(context - 1)
        with torch.no_grad():
            return module(input_ids=self.step_ids, past_key_values=cache, cache_position=position, use_cache=True).logits

    def logits(self, module, context: int) -> torch.Tensor:
        """Float32 logits on the host of one step over a fresh cache of ``context`` slots."""
        cache = self.cache(module, context)
        return self.run(module, cache, context).float().cpu()


def kv_bytes(cache) -> int:
    """Bytes of a static cache's key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def hot_placement(model, hf_config, inputs: torch.Tensor, extra: int):
    """Measure loads on a prefill batch ``inputs`` [1, S], give each of ``extra`` slots per MoE
    layer to the expert with the highest per-replica load (OmniInfer's replica rule)."""
    import omni_passes
    from omni_passes.cli.demo import replicate_hottest
    from omni_passes.placement.placement import Placement

    probe = omni_passes.compile(model, {"passes": ["redundant_experts"]})
    with torch.no_grad():
        probe(inputs)
    loads = probe.omni.controller.take_load()
    phy2log = replicate_hottest(loads, extra)
    return Placement(num_layers=phy2log.shape[0], num_logical_experts=hf_config.n_routed_experts,
                     num_ranks=1, num_nodes=1, slots_per_rank=phy2log.shape[1], phy2log=phy2log)
