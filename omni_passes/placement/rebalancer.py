"""Online rebalancer: re-plan from recorded expert loads while serving, apply in place.

Each serving step (or each load-recording interval) call ``Rebalancer.step()``: it takes the
loads ``omni::record_expert_load`` counted since the last call (``ExpertPlacementState.take_load``)
into a sliding window of the last ``window`` steps. Every ``interval`` steps it plans a new
placement from that window (forecast from the per-step series, migration-aware against the
current placement: repair by swaps or a fresh plan per layer, at most ``max_moves`` changed
slots) and applies it only if the predicted gain in mean balancedness is at least
``min_gain``. Applying writes the new slot weights (any object with ``apply(placement)``,
e.g. the lead's ``PhysicalExperts``) and then the dispatch tables, both in place: tensors keep
their identity and shape, so a compiled model is not recompiled. Call it between forward
passes (it is synchronous).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch

from omni_passes.placement import metrics
from omni_passes.placement.placement import Placement
from omni_passes.placement.planner import PlanError, PlanOptions, forecast_loads, plan
from omni_passes.placement.runtime import ExpertPlacementState


class SupportsApply(Protocol):
    """What holds the expert weights in slots: rewrites them for a placement, in place."""

    def apply(self, placement: Placement) -> None: ...


@dataclass(frozen=True)
class RebalancerConfig:
    """When and how much to rebalance.

    Attributes:
        window: steps of recorded loads kept (the sliding window planned on).
        interval: re-plan every this many steps (K).
        min_gain: apply only if the predicted mean balancedness rises by at least this.
        layer_min_gain: a layer changes only if its own predicted gain is at least this.
        max_moves: most (layer, slot) changes per rebalance (None: no limit).
        num_groups, max_replicas: as for ``plan`` (expert groups, replica cap).
        forecast: plan on ``forecast_loads`` of the window (else on its sum).
        repair_rounds: swap rounds when repairing the current placement.
    """

    window: int = 500
    interval: int = 100
    min_gain: float = 0.01
    layer_min_gain: float = 0.005
    max_moves: int | None = None
    num_groups: int = 1
    max_replicas: int | None = None
    forecast: bool = True
    repair_rounds: int = 4

    def __post_init__(self) -> None:
        if self.window < 1 or self.interval < 1:
            raise ValueError(f"window and interval must be >= 1 step, got {self.window} and {self.interval}")
        if self.min_gain < 0 or self.layer_min_gain < 0:
            raise ValueError("min_gain and layer_min_gain must be >= 0")
        if self.max_moves is not None and self.max_moves < 0:
            raise ValueError(f"max_moves must be >= 0, got {self.max_moves}")


@dataclass(frozen=True)
class RebalanceEvent:
    """What one re-plan found and did: balancedness (predicted, on the forecast loads) of the
    current placement and of the candidate, and the slots the candidate changes (moved only
    if ``applied``)."""

    step: int
    applied: bool
    reason: str
    balancedness_before: float
    balancedness_candidate: float
    moves: int
    plan_ms: float
    half_life: float | None

    def to_dict(self) -> dict:
        return asdict(self)


class Rebalancer:
    """Sliding-window re-planning on top of an ``ExpertPlacementState`` (see module doc)."""

    def __init__(
        self,
        state: ExpertPlacementState,
        weights: SupportsApply | None = None,
        config: RebalancerConfig = RebalancerConfig(),
    ):
        if weights is not None and not callable(getattr(weights, "apply", None)):
            raise TypeError(f"weights must have an apply(placement) method, got {type(weights).__name__}")
        self.state = state
        self.weights = weights
        self.config = config
        self.history: deque[torch.Tensor] = deque(maxlen=config.window)
        self.steps = 0
        self.events: list[RebalanceEvent] = []

    @property
    def placement(self) -> Placement:
        return self.state.placement

    def record(self, loads: torch.Tensor) -> None:
        """Add one step's loads ``[L, E]`` to the window."""
        p = self.placement
        loads = torch.as_tensor(loads)
        if tuple(loads.shape) != (p.num_layers, p.num_logical_experts):
            raise PlanError(
                f"recorded loads have shape {tuple(loads.shape)}, expected ({p.num_layers}, {p.num_logical_experts})"
            )
        self.history.append(loads.detach().to("cpu", torch.float32).clone())

    def step(self, loads: torch.Tensor | None = None) -> RebalanceEvent | None:
        """Record a step (default: ``state.take_load()``); every ``interval`` steps, rebalance."""
        self.record(self.state.take_load() if loads is None else loads)
        self.steps += 1
        if self.steps % self.config.interval == 0:
            return self.rebalance()
        return None

    def rebalance(self) -> RebalanceEvent:
        """Plan from the window and apply if worth it; returns (and logs) what happened."""
        cfg, current = self.config, self.placement
        start = time.perf_counter()
        series = torch.stack(list(self.history)).numpy()
        if cfg.forecast:
            expected, half_life = forecast_loads(series)
        else:
            expected, half_life = series.sum(axis=0, dtype=np.float64), None
        candidate = plan(
            expected,
            current.num_ranks,
            current.num_nodes,
            current.slots_per_rank,
            num_groups=cfg.num_groups,
            max_replicas=cfg.max_replicas,
            previous=current,
            options=PlanOptions(min_gain=cfg.layer_min_gain, max_moves=cfg.max_moves, repair_rounds=cfg.repair_rounds),
        )
        plan_ms = (time.perf_counter() - start) * 1e3
        load = torch.from_numpy(expected)
        before = metrics.score(current, load).mean_balancedness
        after = metrics.score(candidate, load).mean_balancedness
        moves = metrics.slots_changed(current, candidate)
        if moves == 0:
            applied, reason = False, "no layer gains enough to move"
        elif after - before < cfg.min_gain:
            applied, reason = False, f"predicted gain {after - before:.4f} < min_gain {cfg.min_gain}"
        else:
            # Weights first, then tables: between forward passes either order is consistent;
            # this one never routes to a slot before its new weights are in place.
            if self.weights is not None:
                self.weights.apply(candidate)
            self.state.apply(candidate)
            applied, reason = True, f"predicted gain {after - before:.4f}"
        event = RebalanceEvent(
            step=self.steps,
            applied=applied,
            reason=reason,
            balancedness_before=before,
            balancedness_candidate=after,
            moves=moves,
            plan_ms=plan_ms,
            half_life=half_life,
        )
        self.events.append(event)
        return event
