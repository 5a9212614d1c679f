"""The online rebalancer across expert-parallel ranks: one decision, applied everywhere.

Every rank counts the tokens *its* batch routed (``omni::record_expert_load``), but all ranks
must switch to the same placement between the same two steps, or rows would go to slots that
hold other experts. So: each rank buffers its per-step loads; every ``interval_steps`` steps
the buffered ``[interval, L, E]`` loads are summed over ranks (one all-reduce), rank 0 feeds
them step by step to its ``RebalanceLoop`` (sliding window, forecast, migration-aware plan,
gain threshold, move budget: ``omni_passes.placement.rebalance.decide``) and broadcasts the
decision (a flag and the new phy2log); then every rank applies it in place
(``ExpertParallelMoE.apply``: slot weights, then tables).
Collectives: one all-reduce and one broadcast per interval, none in between.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from omni_passes.config import RebalanceConfig
from omni_passes.ep.moe import ExpertParallelMoE
from omni_passes.placement.rebalance import RebalanceEvent, RebalanceLoop


class DistributedRebalancer:
    """Call ``step()`` on every rank after every forward step (synchronous, collective every
    ``config.interval_steps`` steps). Returns the event on the steps that re-planned (on every
    rank: rank 0's event, with ``applied`` as decided), else None."""

    def __init__(self, ep: ExpertParallelMoE, config: RebalanceConfig = RebalanceConfig()):
        self.ep = ep
        self.config = config
        p = ep.placement
        self._loop = RebalanceLoop(config, p.num_layers, p.num_logical_experts) if ep.group.rank == 0 else None
        self._buffer: list[torch.Tensor] = []
        self.events: list[RebalanceEvent] = []

    def _collective_device(self) -> torch.device:
        group = self.ep.group
        nccl = group.distributed and dist.get_backend(group.group) == "nccl"
        return group.device if nccl else torch.device("cpu")

    def step(self) -> RebalanceEvent | None:
        self._buffer.append(self.ep.controller.take_load())
        if len(self._buffer) < self.config.interval_steps:
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
            # the loop decides on the last of these steps (every interval); the group applies below
            decision = [self._loop.step(step_loads, p) for step_loads in loads.cpu()][-1]
            event, pending = self._loop.events[-1], decision.placement
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
        self.events.append(event)
        return event
