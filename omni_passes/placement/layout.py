"""Storage rows: where each placement slot's expert weights live on one device.

On one device the order of slots does not matter for compute, only which storage row each
(expert, replica) reads. The compact layout fixes that invariant once:

* rows ``0 .. E-1`` hold the logical experts ``0 .. E-1`` (the first replica of expert ``e``,
  in slot order, is row ``e``) and never change;
* rows ``E .. P-1`` hold the extra replicas (``P = num_slots``, so ``R = P - E`` extra rows).

So any placement is exact with no weight movement for its permutation part, ``R`` redundant
slots cost ``R`` extra rows (a host's ``[E, ...]`` expert parameter can be a view of the
first ``E`` rows of the ``[P, ...]`` storage), a graph the dispatch pass did not rewrite still
reads the right experts (its logical id ``e`` is row ``e``), and a new placement rewrites only
the extra rows whose expert changes, each copied from its expert's row ``e``.

Expert parallelism places slots on ranks, where a slot *is* its storage (``slot_layout``);
see ``omni_passes.ep``.

All functions are pure: CPU int64 tensors in, new tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """Slot → storage row, per MoE layer.

    Attributes:
        slot_row: int64 ``[L, P]``, the storage row of each placement slot (a permutation).
        row_expert: int64 ``[L, P]``, the logical expert each storage row holds.
    """

    slot_row: torch.Tensor
    row_expert: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.slot_row.shape[1])

    def changed_rows(self, previous: "RowLayout") -> list[torch.Tensor]:
        """Per layer, the rows whose expert differs from ``previous`` (the weight copies)."""
        return [(self.row_expert[layer] != previous.row_expert[layer]).nonzero().flatten()
                for layer in range(self.row_expert.shape[0])]


def slot_layout(phy2log: torch.Tensor) -> RowLayout:
    """Every slot is its own storage row (expert parallelism: a rank stores its slots)."""
    rows = torch.arange(phy2log.shape[1], dtype=torch.int64).expand_as(phy2log).clone()
    return RowLayout(slot_row=rows, row_expert=phy2log.clone())


def compact_layout(phy2log: torch.Tensor, num_experts: int, previous: RowLayout | None = None) -> RowLayout:
    """The compact layout of ``phy2log [L, P]`` (module docstring).

    With ``previous``, extra rows that already hold an expert the new placement replicates
    keep it (lowest rows first), so only rows whose expert changes need a copy.
    """
    num_layers, num_slots = phy2log.shape
    slot_row = torch.empty(num_layers, num_slots, dtype=torch.int64)
    row_expert = torch.empty(num_layers, num_slots, dtype=torch.int64)
    row_expert[:, :num_experts] = torch.arange(num_experts)
    for layer in range(num_layers):
        experts = phy2log[layer].tolist()
        extra_slots: dict[int, list[int]] = {}
        for slot, expert in enumerate(experts):
            if expert in extra_slots:
                extra_slots[expert].append(slot)
            else:
                extra_slots[expert] = []
                slot_row[layer, slot] = expert
        # rows each expert may keep from the previous layout, then the free extra rows
        held: dict[int, list[int]] = {}
        if previous is not None:
            for row in range(num_experts, num_slots):
                held.setdefault(int(previous.row_expert[layer, row]), []).append(row)
        free = []
        assigned: dict[int, list[int]] = {}
        for expert, rows in held.items():
            need = len(extra_slots.get(expert, ()))
            assigned[expert] = rows[:need]
            free.extend(rows[need:])
        if previous is None:
            free = list(range(num_experts, num_slots))
        free.sort(reverse=True)
        for expert, slots in extra_slots.items():
            rows = assigned.setdefault(expert, [])
            while len(rows) < len(slots):
                rows.append(free.pop())
            for slot, row in zip(slots, sorted(rows)):
                slot_row[layer, slot] = row
                row_expert[layer, row] = expert
    return RowLayout(slot_row=slot_row, row_expert=row_expert)


def identity_rows(phy2log: torch.Tensor, num_experts: int) -> bool:
    """True when every expert has one slot (R = 0): row e is expert e, dispatch is the identity."""
    return phy2log.shape[1] == num_experts
