"""Expert placement: which logical expert each physical slot holds, per MoE layer.

The on-disk format (docs/interfaces.md) is::

    {"num_layers": L, "num_logical_experts": E, "num_ranks": R, "num_nodes": N,
     "slots_per_rank": S, "phy2log": [[... R*S logical ids ...] per MoE layer]}

``num_layers`` counts MoE layers in model order; slot ``j`` lives on rank ``j // S``; on one
device all ``R*S`` slots are local. Every logical expert needs at least one slot.

From a placement the dispatch tables are derived (``omni_passes.placement.tables``): for each
layer and logical expert, the slots of its replicas and how many there are. Those are what
``omni::expert_dispatch`` reads at run time, from the placement's owner
(``omni_passes.placement.controller.PlacementController``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REQUIRED_KEYS = ("num_layers", "num_logical_experts", "num_ranks", "num_nodes", "slots_per_rank", "phy2log")


class PlacementError(ValueError):
    """A placement file or object that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class Placement:
    """Physical-slot → logical-expert map for every MoE layer.

    Attributes:
        phy2log: int64 ``[num_layers, num_ranks * slots_per_rank]``.
    """

    num_layers: int
    num_logical_experts: int
    num_ranks: int
    num_nodes: int
    slots_per_rank: int
    phy2log: torch.Tensor

    def __post_init__(self) -> None:
        validate(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.num_ranks * self.slots_per_rank

    @property
    def num_redundant(self) -> int:
        """Slots beyond one per logical expert: the redundancy budget."""
        return self.num_slots - self.num_logical_experts

    def replica_counts(self) -> torch.Tensor:
        """``[num_layers, num_logical_experts]`` int64: slots holding each logical expert."""
        counts = torch.zeros(self.num_layers, self.num_logical_experts, dtype=torch.int64)
        counts.scatter_add_(1, self.phy2log, torch.ones_like(self.phy2log))
        return counts

    def slot_rank(self) -> torch.Tensor:
        """``[num_slots]`` int64: the rank each slot lives on."""
        return torch.arange(self.num_slots) // self.slots_per_rank

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def identity(
        cls,
        num_layers: int,
        num_logical_experts: int,
        num_ranks: int = 1,
        num_nodes: int = 1,
        slots_per_rank: int | None = None,
    ) -> "Placement":
        """Slot ``j`` holds expert ``j``; with spare slots, they repeat experts round-robin."""
        if slots_per_rank is None:
            slots_per_rank = -(-num_logical_experts // num_ranks)
        num_slots = num_ranks * slots_per_rank
        row = torch.arange(num_slots, dtype=torch.int64) % num_logical_experts
        return cls(
            num_layers=num_layers,
            num_logical_experts=num_logical_experts,
            num_ranks=num_ranks,
            num_nodes=num_nodes,
            slots_per_rank=slots_per_rank,
            phy2log=row.repeat(num_layers, 1),
        )

    @classmethod
    def from_dict(cls, data: Any, source: str = "placement") -> "Placement":
        if not isinstance(data, dict):
            raise PlacementError(f"{source}: expected a JSON object, got {type(data).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise PlacementError(f"{source}: missing key(s) {', '.join(missing)}")
        unknown = sorted(set(data) - set(REQUIRED_KEYS))
        if unknown:
            raise PlacementError(f"{source}: unknown key(s) {', '.join(unknown)}")
        sizes = {}
        for key in REQUIRED_KEYS[:-1]:
            value = data[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PlacementError(f"{source}: '{key}' must be a positive integer, got {value!r}")
            sizes[key] = value
        rows = data["phy2log"]
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise PlacementError(f"{source}: 'phy2log' must be a list of lists (one per MoE layer)")
        if len(rows) != sizes["num_layers"]:
            raise PlacementError(
                f"{source}: 'phy2log' has {len(rows)} layer rows but num_layers is {sizes['num_layers']}"
            )
        num_slots = sizes["num_ranks"] * sizes["slots_per_rank"]
        for layer, row in enumerate(rows):
            if len(row) != num_slots:
                raise PlacementError(
                    f"{source}: phy2log[{layer}] has {len(row)} slots, expected num_ranks * slots_per_rank"
                    f" = {sizes['num_ranks']} * {sizes['slots_per_rank']} = {num_slots}"
                )
            bad = [v for v in row if not isinstance(v, int) or isinstance(v, bool)]
            if bad:
                raise PlacementError(f"{source}: phy2log[{layer}] holds non-integer id {bad[0]!r}")
        phy2log = torch.tensor(rows, dtype=torch.int64).reshape(sizes["num_layers"], num_slots)
        try:
            return cls(phy2log=phy2log, **sizes)
        except PlacementError as exc:
            raise PlacementError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Placement":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise PlacementError(f"placement file {path} does not exist") from None
        except OSError as exc:
            raise PlacementError(f"placement file {path} cannot be read: {exc}") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: str | Path) -> "Placement":
        """A placement from the text of the file at ``path`` (named in every error)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlacementError(f"placement file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, source=f"placement file {path}")

    # ---- output --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_logical_experts": self.num_logical_experts,
            "num_ranks": self.num_ranks,
            "num_nodes": self.num_nodes,
            "slots_per_rank": self.slots_per_rank,
            "phy2log": self.phy2log.tolist(),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    def fingerprint(self) -> str:
        """Stable short hash of the whole placement (cache keys, reports)."""
        import hashlib

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def check_fits(self, num_layers: int, num_logical_experts: int, source: str = "placement") -> None:
        """Raise if this placement was made for a model of another shape."""
        if self.num_layers != num_layers or self.num_logical_experts != num_logical_experts:
            raise PlacementError(
                f"{source} is for {self.num_layers} MoE layers x {self.num_logical_experts} experts, "
                f"but the model has {num_layers} MoE layers x {num_logical_experts} routed experts"
            )


def validate(placement: Placement) -> None:
    """Raise PlacementError naming the first inconsistency found."""
    p = placement
    for key in REQUIRED_KEYS[:-1]:
        value = getattr(p, key)
        if not isinstance(value, int) or value <= 0:
            raise PlacementError(f"'{key}' must be a positive integer, got {value!r}")
    if p.num_ranks % p.num_nodes != 0:
        raise PlacementError(f"num_ranks ({p.num_ranks}) is not divisible by num_nodes ({p.num_nodes})")
    if p.num_slots < p.num_logical_experts:
        raise PlacementError(
            f"{p.num_slots} slots (num_ranks * slots_per_rank) cannot hold {p.num_logical_experts} experts"
        )
    t = p.phy2log
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
        raise PlacementError("phy2log must be an int64 tensor")
    if tuple(t.shape) != (p.num_layers, p.num_slots):
        raise PlacementError(f"phy2log has shape {tuple(t.shape)}, expected ({p.num_layers}, {p.num_slots})")
    out_of_range = (t < 0) | (t >= p.num_logical_experts)
    if bool(out_of_range.any()):
        layer, slot = (int(i) for i in out_of_range.nonzero()[0])
        raise PlacementError(
            f"phy2log[{layer}][{slot}] = {int(t[layer, slot])} is out of range [0, {p.num_logical_experts})"
        )
    present = torch.zeros(p.num_layers, p.num_logical_experts, dtype=torch.bool)
    present.scatter_(1, t, True)
    if not bool(present.all()):
        layer, expert = (int(i) for i in (~present).nonzero()[0])
        raise PlacementError(f"MoE layer {layer}: logical expert {expert} has no slot (every expert needs a replica)")
