"""The logical weights of DeepSeek MoE layers, and where a rank gets an expert's weights from.

A rank of an expert-parallel run holds only the experts of its placement's slots. Which
experts those are changes when a new placement is applied, so slot weights are always
*materialised* from a source of logical expert weights:

* ``TensorExperts``: the stacked ``[E, ...]`` weights of a loaded model (any device; tests and
  the single-device reference use the same tensors).
* ``SeededExperts``: expert ``e`` of layer ``l`` regenerated from a seed on demand. Benchmarks at
  DeepSeek-V3 size use it: no rank ever holds all 256 experts, and every rank that gets expert
  ``e`` gets the same numbers. (A serving deployment would read the checkpoint, or copy from a
  peer rank; the interface is the same: fill these slots with these experts.)

Layout follows transformers' ``DeepseekV3Experts``: ``gate_up [E, 2I, H]`` (gate rows first,
then up), ``down [E, H, I]``; SiLU gating.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class MoESpec:
    """Sizes and routing rule of one DeepSeek MoE layer.

    Attributes:
        hidden_size H, moe_intermediate_size I, num_experts E (routed), top_k K.
        n_group, topk_group: group-limited routing (DeepSeek-V3: 8 groups, best 4 kept).
        norm_topk_prob: renormalise the K routing weights to sum 1.
        routed_scaling_factor: multiplies the routing weights.
        shared_intermediate_size: width of the shared expert MLP (0: none).
    """

    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    shared_intermediate_size: int = 0

    def __post_init__(self) -> None:
        for key in ("hidden_size", "moe_intermediate_size", "num_experts", "top_k", "n_group", "topk_group"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MoESpec.{key} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoESpec: top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if self.num_experts % self.n_group or self.topk_group > self.n_group:
            raise ValueError(
                f"MoESpec: {self.num_experts} experts in {self.n_group} groups, keep {self.topk_group}: "
                "experts must divide into groups and topk_group <= n_group"
            )
        if self.shared_intermediate_size < 0:
            raise ValueError(f"MoESpec.shared_intermediate_size must be >= 0, got {self.shared_intermediate_size}")

    @classmethod
    def from_hf_config(cls, config) -> "MoESpec":
        """From a transformers DeepSeek-V3 config (``n_routed_experts``, ``num_experts_per_tok``, ...)."""
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"expert-parallel MoE supports SiLU experts; the config has hidden_act={act!r}")
        shared = getattr(config, "n_shared_experts", 0) or 0
        return cls(
            hidden_size=config.hidden_size,
            moe_intermediate_size=config.moe_intermediate_size,
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            n_group=getattr(config, "n_group", 1) or 1,
            topk_group=getattr(config, "topk_group", 1) or 1,
            norm_topk_prob=bool(getattr(config, "norm_topk_prob", True)),
            routed_scaling_factor=float(getattr(config, "routed_scaling_factor", 1.0)),
            shared_intermediate_size=config.moe_intermediate_size * shared,
        )


class ExpertSource(Protocol):
    """Logical expert weights of one MoE layer, handed out by expert id."""

    num_experts: int

    def fill(self, experts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Write expert ``experts[i]``'s weights into ``gate_up[i] [2I, H]`` and ``down[i] [H, I]``
        (in place; the outputs may live on another device than the source)."""


@dataclass
class TensorExperts:
    """Experts from stacked tensors ``gate_up [E, 2I, H]`` and ``down [E, H, I]``."""

    gate_up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        if self.gate_up.dim() != 3 or self.down.dim() != 3 or self.gate_up.shape[0] != self.down.shape[0]:
            raise ValueError(
                f"TensorExperts needs gate_up [E, 2I, H] and down [E, H, I]; got {tuple(self.gate_up.shape)} "
                f"and {tuple(self.down.shape)}"
            )

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def fill(self, experts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        index = experts.to(self.gate_up.device)
        gate_up.copy_(self.gate_up.index_select(0, index))
        down.copy_(self.down.index_select(0, index))


@dataclass
class SeededExperts:
    """Expert ``e`` of layer ``layer`` drawn from N(0, 1/fan_in) with a seed of its own."""

    spec: MoESpec
    layer: int
    seed: int = 0
    num_experts: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_experts = self.spec.num_experts

    def _generator(self, device: torch.device, expert: int, part: int) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(((self.seed * 1_000_003 + self.layer) * 4_099 + expert) * 3 + part)
        return generator

    def fill(self, experts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        H, I = self.spec.hidden_size, self.spec.moe_intermediate_size
        for i, expert in enumerate(experts.tolist()):
            for part, out, fan_in in ((0, gate_up[i], H), (1, down[i], I)):
                values = torch.randn(out.shape, generator=self._generator(out.device, expert, part), device=out.device)
                out.copy_(values.mul_(fan_in**-0.5))

    def stacked(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TensorExperts:
        """All experts as a ``TensorExperts`` (a reference run holds them all)."""
        E, H, I = self.spec.num_experts, self.spec.hidden_size, self.spec.moe_intermediate_size
        gate_up = torch.empty(E, 2 * I, H, device=device, dtype=dtype)
        down = torch.empty(E, H, I, device=device, dtype=dtype)
        self.fill(torch.arange(E), gate_up, down)
        return TensorExperts(gate_up, down)


@dataclass
class MoELayerWeights:
    """One MoE layer's weights except the routed experts' (which come from ``experts``).

    Attributes:
        router: ``[E, H]`` gate weight; ``bias``: ``[E]`` e_score_correction_bias (float32).
        shared_gate, shared_up: ``[Is, H]``; shared_down: ``[H, Is]`` (None without a shared expert).
    """

    router: torch.Tensor
    bias: torch.Tensor
    experts: ExpertSource
    shared_gate: torch.Tensor | None = None
    shared_up: torch.Tensor | None = None
    shared_down: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "MoELayerWeights":
        """Router and shared weights moved (the expert source stays where it is)."""

        def move(t, keep_dtype=False):
            if t is None:
                return None
            return t.to(device=device, dtype=None if keep_dtype or dtype is None else dtype)

        return MoELayerWeights(
            router=move(self.router),
            bias=move(self.bias, keep_dtype=True),
            experts=self.experts,
            shared_gate=move(self.shared_gate),
            shared_up=move(self.shared_up),
            shared_down=move(self.shared_down),
        )

    @classmethod
    def from_hf_moe(cls, moe) -> "MoELayerWeights":
        """From a transformers ``DeepseekV3MoE`` module (weights are shared, not copied)."""
        shared = getattr(moe, "shared_experts", None)
        return cls(
            router=moe.gate.weight.detach(),
            bias=moe.gate.e_score_correction_bias.detach().float(),
            experts=TensorExperts(moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach()),
            shared_gate=None if shared is None else shared.gate_proj.weight.detach(),
            shared_up=None if shared is None else shared.up_proj.weight.detach(),
            shared_down=None if shared is None else shared.down_proj.weight.detach(),
        )

    @classmethod
    def seeded(cls, spec: MoESpec, layer: int, seed: int = 0, device="cpu", dtype=torch.float32) -> "MoELayerWeights":
        """Random weights for benchmarks: seeded router, bias, shared expert; ``SeededExperts``."""
        generator = torch.Generator().manual_seed(seed * 7_919 + layer)
        H, E, Is = spec.hidden_size, spec.num_experts, spec.shared_intermediate_size

        def draw(*shape, fan_in):
            return (torch.randn(*shape, generator=generator) * fan_in**-0.5).to(device=device, dtype=dtype)

        return cls(
            router=draw(E, H, fan_in=H),
            bias=(torch.rand(E, generator=generator) * 0.1).to(device),
            experts=SeededExperts(spec, layer, seed),
            shared_gate=draw(Is, H, fan_in=H) if Is else None,
            shared_up=draw(Is, H, fan_in=H) if Is else None,
            shared_down=draw(H, Is, fan_in=Is) if Is else None,
        )
