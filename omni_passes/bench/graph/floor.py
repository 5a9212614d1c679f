"""The HBM floor of a decode step (CUDA): the bytes it must move over the copy bandwidth
measured in the same run."""

from __future__ import annotations

from typing import Any

import torch

from omni_passes.bench.graph.model import DecodeSteps
from omni_passes.bench.measure import copy_bandwidth


class StepFloor:
    """The bytes a decode step must move over the measured copy bandwidth.

    Bytes: every weight the step uses read once (all attention, dense-MLP, shared-expert and
    norm weights and the LM head; of the routed experts only those this batch selects, counted
    from the eager step's routing; B rows of the embedding), the latent cache rows each layer must
    read (all ``context`` rows; sink + recent in a variant's sparse pattern layers), the new
    cache row and the logits written. Bandwidth: a 1 GiB device-to-device copy, read + write
    bytes over time, median of 10, measured in the same run.
    """

    def __init__(self, weight_bytes: int, kv_row_bytes: int, out_bytes: int, copy_bytes_per_s: float,
                 num_layers: int, window: int, pattern: list[int]):
        self.weight_bytes, self.kv_row_bytes, self.out_bytes = weight_bytes, kv_row_bytes, out_bytes
        self.copy_bytes_per_s, self.num_layers, self.window, self.pattern = copy_bytes_per_s, num_layers, window, pattern

    @classmethod
    def measure(cls, model, steps: DecodeSteps, hf_config, batch, dtype, device, sink, recent, pattern):
        """None off CUDA (the floor is a device-memory figure)."""
        if device != "cuda":
            return None
        touched = touched_experts(model, steps, context=2)
        itemsize = torch.empty((), dtype=dtype).element_size()
        weight_bytes = 0
        for name, param in model.named_parameters():
            nbytes = param.numel() * param.element_size()
            if "embed_tokens" in name:
                nbytes = batch * param.shape[-1] * param.element_size()
            elif ".experts." in name and param.dim() == 3:  # [E, ...] stacked routed experts
                layer = int(name.split("layers.")[1].split(".")[0])
                nbytes = nbytes // param.shape[0] * touched.get(layer, param.shape[0])
            weight_bytes += nbytes
        kv_row = batch * (hf_config.kv_lora_rank + hf_config.qk_rope_head_dim) * itemsize
        out_bytes = batch * hf_config.vocab_size * itemsize + hf_config.num_hidden_layers * kv_row
        return cls(weight_bytes, kv_row, out_bytes, copy_bandwidth(device), hf_config.num_hidden_layers,
                   sink + recent, pattern)

    def bytes(self, context: int, sparse: bool) -> int:
        rows = sum(min(self.window, context) if sparse and i in self.pattern else context for i in range(self.num_layers))
        return self.weight_bytes + rows * self.kv_row_bytes + self.out_bytes

    def of(self, family: str, context: int, seconds: float) -> dict[str, Any]:
        sparse = any(k in family for k in ("sparse", "all"))
        nbytes = self.bytes(context, sparse)
        floor_s = nbytes / self.copy_bytes_per_s
        return {"bytes": nbytes, "floor_us": floor_s * 1e6, "pct_of_floor": 100 * floor_s / seconds}

    def describe(self, contexts: list[int]) -> dict[str, Any]:
        return {"copy_tb_s": self.copy_bytes_per_s / 1e12, "weight_bytes": self.weight_bytes,
                "kv_row_bytes": self.kv_row_bytes,
                "by_context": {str(c): {"bytes_dense": self.bytes(c, False),
                                        "floor_us_dense": self.bytes(c, False) / self.copy_bytes_per_s * 1e6,
                                        "bytes_sparse": self.bytes(c, True),
                                        "floor_us_sparse": self.bytes(c, True) / self.copy_bytes_per_s * 1e6}
                               for c in contexts},
                "rule": StepFloor.__doc__.split("\n\n")[1].replace("\n    ", " ").strip()}


def touched_experts(model, steps: DecodeSteps, context: int) -> dict[int, int]:
    """Decoder layer -> distinct routed experts one eager decode step of this batch selects."""
    seen: dict[int, int] = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is None:
            continue

        def hook(_module, args, kwargs, index=index):
            ids = next((a for a in list(args) + list(kwargs.values())
                        if isinstance(a, torch.Tensor) and not a.is_floating_point()), None)
            if ids is not None:
                seen[index] = int(ids.unique().numel())

        hooks.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        steps.logits(model, context)
    finally:
        for handle in hooks:
            handle.remove()
    return seen
