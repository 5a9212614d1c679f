"""The online rebalancer across expert-parallel ranks: one decision, applied everywhere.

Every rank counts the tokens *its* batch routed (``omni::record_expert_load``), but all ranks
must switch to the same placement between the same two steps, or rows would go to slots that
hold other experts. So: each rank buffers its per-step loads; every ``interval`` steps the
buffered ``[interval, L, E]`` loads are summed over ranks (one all-reduce), rank 0 feeds them
step by step to the single-device ``Rebalancer`` (sliding window, forecast, migration-aware
plan, gain threshold, move budget) and broadcasts its decision (a flag and the new phy2log);
then every rank applies it in place (``ExpertParallelMoE.apply``: slot weights, then tables).
Collectives: one all-reduce and one broadcast per interval, none in between.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from omni_passes.ep.moe import ExpertParallelMoE
from omni_passes.placement.placement import Placement
from omni_passes.placement.rebalancer import RebalanceEvent, Rebalancer, RebalancerConfig


class _Decision:
    """Stands in for the placement state on rank 0: the rebalancer's ``apply`` only records the
    candidate here; the group applies it after the broadcast."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self.pending: Placement | None = None

    def apply(self, placement: Placement) -> None:
        self.pending = placement
        self.placement = placement


class DistributedRebalancer:
    """Call ``step()`` on every rank after every forward step (synchronous, collective every
    ``config.interval`` steps). Returns the event on the steps that re-planned (on every rank:
    rank 0's event, with ``applied`` as decided), else None."""

    def __init__(self, ep: ExpertParallelMoE, config: RebalancerConfig = RebalancerConfig()):
        self.ep = ep
        self.config = config
        self._decision = _Decision(ep.placement)
        self._rebalancer = Rebalancer(self._decision, weights=None, config=config) if ep.group.rank == 0 else None
        self._buffer: list[torch.Tensor] = []
        self.events: list[RebalanceEvent] = []

    def _collective_device(self) -> torch.device:
        group = self.ep.group
        nccl = group.distributed and dist.get_backend(group.group) == "nccl"
        return group.device if nccl else torch.device("cpu")

    def step(self) -> RebalanceEvent | None:
        self._buffer.append(self.ep.state.take_load())
        if len(self._buffer) < self.config.interval:
            return None
        group, device = self.ep.group, self._collective_device()
        loads = torch.stack(self._buffer).to(device)
        self._buffer = []
        if group.distributed:
            dist.all_reduce(loads, group=group.group)
        p = self.ep.placement
        header = torch.zeros(1 + 6, dtype=torch.float64, device=device)
        phy2log = torch.empty(p.num_layers, p.num_slots, dtype=torch.int64, device=device)
        if group.rank == 0:
            for step_loads in loads.cpu():
                self._rebalancer.step(step_loads)  # re-plans on the last one (every interval)
            event = self._rebalancer.events[-1]
            pending, self._decision.pending = self._decision.pending, None
            header[0] = 1.0 if pending is not None else 0.0
            header[1:] = torch.tensor(
                [event.step, event.balancedness_before, event.balancedness_candidate, event.moves, event.plan_ms,
                 -1.0 if event.half_life is None else event.half_life], dtype=torch.float64)
            if pending is not None:
                phy2log.copy_(pending.phy2log)
        if group.distributed:
            dist.broadcast(header, src=0, group=group.group)
            dist.broadcast(phy2log, src=0, group=group.group)
        values = header.cpu().tolist()
        applied = values[0] == 1.0
        if group.rank != 0:
            event = RebalanceEvent(
                step=int(values[1]), applied=applied, reason="decided on rank 0",
                balancedness_before=values[2], balancedness_candidate=values[3], moves=int(values[4]),
                plan_ms=values[5], half_life=None if values[6] < 0 else values[6],
            )
        if applied:
            self.ep.apply(replace(p, phy2log=phy2log.cpu()))
            self._decision.placement = self.ep.placement
        self.events.append(event)
        return event
