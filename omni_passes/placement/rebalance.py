"""Online rebalancing: from a window of recorded loads, whether to move to a new placement.

``decide`` is the decision, a pure function: forecast the window (or sum it), plan
migration-aware against the running placement (repair by swaps or a fresh plan per layer,
at most ``max_moves`` changed slots, a layer changes only for ``layer_min_gain``), and keep
the candidate only if the predicted gain in mean balancedness is at least ``min_gain``.

``RebalanceLoop`` is the little state around it: a sliding window of the last
``window_steps`` steps' loads, a step count, a decision every ``interval_steps`` steps, and the
events. It never touches a placement: the owner applies what it decides
(``PlacementController.rebalance_step`` on one device; ``omni_passes.ep.rebalance`` across
expert-parallel ranks, where rank 0 decides and every rank applies). Applying writes the
weights, then the dispatch tables, in place, so a compiled model is not recompiled.

The settings are ``omni_passes.config.RebalanceConfig`` (the ``"rebalance"`` block of the pass
configuration, validated where it is built); ``plan_options`` translates them for the planner.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import torch

from omni_passes.config import RebalanceConfig
from omni_passes.placement import metrics
from omni_passes.placement.forecast import forecast_loads
from omni_passes.placement.placement import Placement
from omni_passes.placement.planner import PlanError, PlanOptions, plan


@dataclass(frozen=True)
class Decision:
    """What ``decide`` found: the placement to apply (None: keep the running one), why, and
    the predicted balancedness (on the forecast loads) of the running placement and of the
    candidate, with the slots the candidate changes."""

    placement: Placement | None
    reason: str
    balancedness_before: float
    balancedness_candidate: float
    moves: int
    half_life: float | None


@dataclass(frozen=True)
class RebalanceEvent:
    """One re-plan of a loop: its step, whether the owner applied the candidate, and the
    decision's figures (``plan_ms``: how long the decision took)."""

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


def plan_options(config: RebalanceConfig) -> PlanOptions:
    """The planner's options for a re-plan under ``config``."""
    return PlanOptions(forecast=config.forecast, min_gain=config.layer_min_gain, max_moves=config.max_moves)


def decide(window_loads: torch.Tensor | np.ndarray, current: Placement, config: RebalanceConfig) -> Decision:
    """Whether to move from ``current`` given the loads of the window.

    Args:
        window_loads: float ``[T, L, E]`` tokens per step, MoE layer and logical expert,
            oldest step first.
        current: the running placement (the candidate keeps its ranks, nodes and slots).
        config: thresholds, move budget, replica cap, forecast on or off.

    Returns:
        a ``Decision`` whose ``placement`` is the candidate if it moves a slot and its
        predicted mean balancedness gain is at least ``config.min_gain``, else None.
    """
    series = window_loads.numpy() if isinstance(window_loads, torch.Tensor) else np.asarray(window_loads)
    if config.forecast:
        expected, half_life = forecast_loads(series)
    else:
        expected, half_life = series.sum(axis=0, dtype=np.float64), None
    candidate = plan(expected, current.num_ranks, current.num_nodes, current.slots_per_rank,
                     max_replicas=config.max_replicas, previous=current, options=plan_options(config))
    load = torch.from_numpy(expected)
    before = metrics.score(current, load).mean_balancedness
    after = metrics.score(candidate, load).mean_balancedness
    moves = metrics.slots_changed(current, candidate)
    if moves == 0:
        chosen, reason = None, "no layer gains enough to move"
    elif after - before < config.min_gain:
        chosen, reason = None, f"predicted gain {after - before:.4f} < min_gain {config.min_gain}"
    else:
        chosen, reason = candidate, f"predicted gain {after - before:.4f}"
    return Decision(placement=chosen, reason=reason, balancedness_before=before, balancedness_candidate=after,
                    moves=moves, half_life=half_life)


class RebalanceLoop:
    """The window of step loads and a ``decide`` every ``config.interval_steps`` steps.

    Args:
        config: the rebalance settings.
        num_layers, num_experts: the shape ``[L, E]`` of one step's loads.
    """

    def __init__(self, config: RebalanceConfig, num_layers: int, num_experts: int):
        self.config = config
        self.shape = (num_layers, num_experts)
        self.window: deque[torch.Tensor] = deque(maxlen=config.window_steps)
        self.steps = 0
        self.events: list[RebalanceEvent] = []

    def record(self, loads: torch.Tensor) -> None:
        """Add one step's loads ``[L, E]`` to the window."""
        loads = torch.as_tensor(loads)
        if tuple(loads.shape) != self.shape:
            raise PlanError(f"recorded loads have shape {tuple(loads.shape)}, expected {self.shape}")
        self.window.append(loads.detach().to("cpu", torch.float32).clone())

    def step(self, loads: torch.Tensor, current: Placement) -> Decision | None:
        """Record a step; on every ``interval_steps``-th step decide (the event is recorded as
        applied when the decision names a placement: the caller applies it now)."""
        self.record(loads)
        self.steps += 1
        if self.steps % self.config.interval_steps:
            return None
        start = time.perf_counter()
        decision = decide(torch.stack(list(self.window)), current, self.config)
        plan_ms = (time.perf_counter() - start) * 1e3
        self.events.append(RebalanceEvent(
            step=self.steps, applied=decision.placement is not None, reason=decision.reason,
            balancedness_before=decision.balancedness_before, balancedness_candidate=decision.balancedness_candidate,
            moves=decision.moves, plan_ms=plan_ms, half_life=decision.half_life,
        ))
        return decision
