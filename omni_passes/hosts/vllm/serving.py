"""OmniPlacement inside a serving engine: per-step counting gate, load files, rebalancing.

A serving host whose MoE ops run eagerly every step (vLLM on CPU: ``omni::slot_fused_moe``)
registers one ``ServingSteps`` per model as a step hook (``kernels.state``). On each step:

* ``begin`` (before MoE layer 0 computes): the count gate is set from ``is_serving()``, so
  warm-up and profiling batches (dummy tokens) are not counted as load;
* ``end`` (after the last MoE layer computed, before any later step): on serving steps, the
  load files are updated and the online rebalancer runs; an applied placement is in place
  (storage rows, then tables) before the next step's first MoE layer.

Load files (``expert_load_path [L, E]``, ``slot_load_path [L, P]``, int64 ``.npy``,
cumulative) are memory-mapped: they are rewritten in place at the end of every serving step
(a copy into the page cache, no system call) and flushed every ``interval_steps`` steps and at
close. The file therefore holds the loads of the last completed step even when the engine
process is killed without warning (vLLM's api_server stops its engine with SIGKILL after
SIGTERM unless ``--shutdown-timeout`` is given). A reader racing a running engine may see
layers of two consecutive steps.

On vLLM CUDA the op does not run Python per step (CUDA graphs replay it), so the worker's
``execute_model`` drives the steps instead (``ServingSteps.for_cuda_graphs``, ``steps``): ``begin``
opens the gate and marks the step's real tokens, ``end`` is the same end of step; the load files
are rewritten every ``interval_steps`` steps only (reading counters syncs the device). The online
rebalancer there reads its step loads once per re-plan interval (``StepSnapshots``), not once per
step: a read per step made the host wait for every step's GPU work, which undid vLLM's
asynchronous scheduling (on the H100, DeepSeek-V2-Lite: TPOT 5.14 ms at batch 1 against 3.84 ms
for the same placement without rebalancing).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from omni_passes.config import RebalanceConfig
from omni_passes.placement.rebalance import RebalanceEvent, RebalanceLoop

log = logging.getLogger("omni_passes")


class LoadFile:
    """An int64 ``.npy`` of fixed shape, memory-mapped and rewritten in place."""

    def __init__(self, path: str | Path, shape: tuple[int, ...]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.int64, shape=shape)
        self.array.flush()  # an all-zero file from the start: readers never see a missing file

    def write(self, values: torch.Tensor) -> None:
        self.array[...] = values.numpy()

    def flush(self) -> None:
        self.array.flush()


class LoadExport:
    """The controller's cumulative loads in ``expert_path`` / ``slot_path`` (either optional)."""

    def __init__(self, controller, expert_path: str | None, slot_path: str | None, interval: int,
                 every_step: bool = True):
        """``every_step``: rewrite the files after every serving step (CPU: a copy into the page
        cache); else only every ``interval`` steps (CUDA: reading the counters syncs the device,
        which would stall vLLM's asynchronous scheduling once per step)."""
        p = controller.placement
        self.controller = controller
        self.interval = interval
        self.every_step = every_step
        self.steps = 0
        self.expert_file = LoadFile(expert_path, (p.num_layers, p.num_logical_experts)) if expert_path else None
        self.slot_file = LoadFile(slot_path, (p.num_layers, p.num_slots)) if slot_path else None

    def step_end(self) -> None:
        self.steps += 1
        due = self.steps % self.interval == 0
        if self.every_step or due:
            self.write(flush=due)

    def write(self, flush: bool = True) -> None:
        for file, values in ((self.expert_file, self.controller.total_expert_load),
                             (self.slot_file, self.controller.total_slot_load)):
            if file is not None:
                file.write(values())
                if flush:
                    file.flush()


class StepSnapshots:
    """Each step's counts of a cumulative device counter, read back once every ``steps`` steps.

    After every step the counter is copied into a device ring of ``steps + 1`` snapshots (one
    device copy, queued behind the step's work: no wait); on the ring's last step it comes back
    in one copy and the steps' counts are the differences of consecutive snapshots."""

    def __init__(self, counter: torch.Tensor, steps: int):
        self.counter = counter
        self.ring = torch.empty((steps + 1, *counter.shape), dtype=counter.dtype, device=counter.device)
        self.ring[0].copy_(counter)
        self.filled = 0

    def take(self) -> list[torch.Tensor] | None:
        """Record this step; on every ``steps``-th call, the counts of those steps (oldest
        first, CPU), else None."""
        self.filled += 1
        self.ring[self.filled].copy_(self.counter)
        if self.filled < self.ring.shape[0] - 1:
            return None
        host = self.ring.to("cpu", copy=True)  # the one wait of the interval (a copy on CPU too)
        self.ring[0].copy_(self.ring[-1])
        self.filled = 0
        return list(torch.diff(host, dim=0))


class OnlineRebalancer:
    """The OmniPlacement loop: the step's counted loads into a sliding window, and every
    ``interval_steps`` a forecast, migration-aware plan (gain threshold, move budget) applied
    in place through the controller (``PlacementController.rebalance_step``); each re-plan is
    logged.

    ``batched_reads`` (CUDA): the counters stay cumulative on the device and the loads of an
    interval's steps reach the loop together at its last step (``StepSnapshots``), where the
    loop re-plans anyway: the same loads in the same order, so the same decisions at the same
    steps, with one device-to-host copy per interval instead of one per step."""

    def __init__(self, controller, settings: RebalanceConfig, batched_reads: bool = False):
        p = controller.placement
        self.controller = controller
        self.loop = RebalanceLoop(settings, p.num_layers, p.num_logical_experts)
        self.snapshots = StepSnapshots(controller.expert_load, settings.interval_steps) if batched_reads else None

    @property
    def events(self) -> list[RebalanceEvent]:
        return self.loop.events

    def step_end(self) -> None:
        if self.snapshots is None:
            self._step(None)  # the controller takes (and resets) this step's counts
            return
        for loads in self.snapshots.take() or ():
            self._step(loads)

    def _step(self, loads: torch.Tensor | None) -> None:
        event = self.controller.rebalance_step(self.loop, loads)
        if event is not None:
            log.info("omni rebalance at step %d: %s (%s), balancedness %.4f -> %.4f, %d slot moves, plan %.1f ms",
                     event.step, "applied" if event.applied else "kept", event.reason,
                     event.balancedness_before, event.balancedness_candidate, event.moves, event.plan_ms)


class ServingSteps:
    """The step hook of one serving model (module docstring)."""

    def __init__(self, controller, is_serving: Callable[[], bool], export: LoadExport | None = None,
                 rebalancer: OnlineRebalancer | None = None):
        self.controller = controller
        self.is_serving = is_serving
        self.export = export
        self.rebalancer = rebalancer
        self.serving = False
        self.open = False
        self.steps = 0
        self.token_mask: torch.Tensor | None = None  # CUDA only (for_cuda_graphs)

    def __call__(self, phase: str) -> None:
        if phase == "next":  # a host that sees only step starts (kernels.state)
            if self.open:
                self("end")
            phase = "begin"
        if phase == "begin":
            self.serving = bool(self.is_serving())
            self.controller.gate.fill_(1 if self.serving else 0)
            self.open = True
        elif phase == "end":
            self.open = False
            if not self.serving:
                return
            self.steps += 1
            if self.rebalancer is not None:
                self.rebalancer.step_end()  # takes this step's loads (they stay in the totals)
            if self.export is not None:
                self.export.step_end()

    # ---- CUDA: steps driven by the worker (omni_passes.hosts.vllm.steps) -----------------------
    @classmethod
    def for_cuda_graphs(cls, controller, export: LoadExport | None, rebalancer: "OnlineRebalancer | None",
                        max_tokens: int) -> "ServingSteps":
        """Steps driven from ``Worker.execute_model``, which knows each step's real token count:
        the gate is closed until the first serving step (vLLM's warm-up, profiling and CUDA-graph
        capture run the model without it), and ``token_mask [max_tokens]`` marks the real tokens of
        a batch vLLM padded to a captured size (the counting op reads it at replay)."""
        steps = cls(controller, lambda: True, export, rebalancer)
        steps.token_mask = torch.zeros(max_tokens, dtype=torch.bool, device=controller.device)
        controller.gate.fill_(0)
        return steps

    def begin(self, num_tokens: int) -> None:
        """A serving step of ``num_tokens`` real tokens starts (device writes only, no sync)."""
        mask = self.token_mask
        mask[:num_tokens].fill_(True)
        mask[num_tokens:].fill_(False)
        self.controller.gate.fill_(1)
        self.serving = self.open = True

    def end(self) -> None:
        self("end")

    def close(self) -> None:
        if self.export is not None:
            self.export.write(flush=True)
