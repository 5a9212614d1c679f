"""The token exchange of an expert-parallel MoE layer, on torch.distributed collectives.

Dispatch: every rank has sorted its (token, choice) rows by destination slot, so the rows for
rank d are one contiguous block, ordered by d's local slot. Two collectives move them:

1. ``all_to_all_single`` of the per-slot row counts ``[W * S]``: afterwards each rank knows,
   for every source rank, how many rows it gets for each of its S local slots. One host sync
   turns the per-rank sums into split sizes (variable-size all-to-all needs them on the host).
2. ``all_to_all_single`` of the rows themselves with those splits.

The receiver rebuilds each row's local slot from the counts (``repeat_interleave``), so no
slot ids travel. Combine is the same all-to-all with the splits swapped. The collectives stay
outside the compiled regions (see ``omni_passes.ep.layer``): their split sizes are host data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

PAD_ROWS = 8  # receive buffers are rounded up to this many rows (see ExpertParallelMoE)


@dataclass
class Splits:
    """Host-side split sizes of one layer's exchange: rows this rank sends to / receives from each rank."""

    send: list[int]
    recv: list[int]

    @property
    def num_recv(self) -> int:
        return sum(self.recv)

    @property
    def num_send(self) -> int:
        return sum(self.send)


@dataclass
class EPGroup:
    """Who this rank is in the expert-parallel group, and the group itself (None: default)."""

    rank: int
    world_size: int
    device: torch.device
    group: dist.ProcessGroup | None = None

    @property
    def distributed(self) -> bool:
        """Collectives run whenever a process group exists (also at world size 1, so a one-GPU
        run goes through NCCL like a multi-GPU one); a lone process without one copies locally."""
        return dist.is_available() and dist.is_initialized()

    def exchange_counts(self, send_counts: torch.Tensor, slots_per_rank: int) -> tuple[torch.Tensor, Splits]:
        """``send_counts [W * S]`` rows per destination slot → rows received per (source, local slot)
        ``[W * S]`` and the host split sizes (one device→host sync)."""
        recv_counts = torch.empty_like(send_counts)
        if not self.distributed:
            recv_counts.copy_(send_counts)
        else:
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        per_rank = torch.stack([send_counts, recv_counts]).view(2, self.world_size, slots_per_rank).sum(-1)
        send, recv = per_rank.tolist()
        return recv_counts, Splits(send=send, recv=recv)

    def all_to_all(self, out: torch.Tensor, rows: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        """Variable-size all-to-all of rows (``out`` and ``rows`` contiguous)."""
        if not self.distributed:
            out.copy_(rows)
            return
        dist.all_to_all_single(out, rows, out_splits, in_splits, group=self.group)


def padded_rows(n: int) -> int:
    """Rows of a receive buffer for ``n`` rows: at least PAD_ROWS, a multiple of PAD_ROWS.

    Why: the compiled expert region is dynamic in its row count, and Dynamo specialises sizes 0
    and 1; padding keeps every call on one graph (pad rows go to a sentinel slot no GEMM reads).
    """
    return max(PAD_ROWS, -(-n // PAD_ROWS) * PAD_ROWS)


def local_slot_of_rows(recv_counts: torch.Tensor, slots_per_rank: int, num_rows: int, padded: int) -> torch.Tensor:
    """Local slot of each received row, ``[padded]`` int64, pad rows marked with slot S.

    Rows arrive grouped by source rank, and within a source by local slot (the sender sorted
    them), so the slots are ``0..S-1`` repeated per source, each ``recv_counts[w * S + s]`` times.
    """
    world = recv_counts.numel() // slots_per_rank
    device = recv_counts.device
    ids = torch.arange(slots_per_rank + 1, device=device)
    pattern = torch.cat([ids[:-1].repeat(world), ids[-1:]])
    counts = torch.cat([recv_counts, recv_counts.new_full((1,), padded - num_rows)])
    return torch.repeat_interleave(pattern, counts, output_size=padded)
