"""Fault injection for the simulated engine.

Per request, in this order (counters first, then rates drawn from a seeded generator):

* ``fail``:  answer HTTP 500 before any byte of a completion (``fail_next`` / ``fail_rate``);
* ``stall``: accept the request and never answer (until the client goes away);
* ``crash``: reset the connection after ``crash_after_tokens`` generated tokens (mid-stream for
  streaming requests; before the response for the others);

and for the whole instance:

* ``slowdown``: multiply every engine step time by this factor (1.0 = normal);
* ``refuse``:   stop listening for ``refuse_s`` seconds (connection refused) and reset requests
  that arrive on connections already open.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

FAULT_FIELDS = ("fail_next", "fail_rate", "stall_next", "stall_rate", "crash_next", "crash_rate",
                "crash_after_tokens", "slowdown", "refuse_s", "seed")


@dataclass
class FaultPlan:
    fail_next: int = 0
    fail_rate: float = 0.0
    stall_next: int = 0
    stall_rate: float = 0.0
    crash_next: int = 0
    crash_rate: float = 0.0
    crash_after_tokens: int = 2
    slowdown: float = 1.0
    seed: int = 0
    injected: dict[str, int] = field(default_factory=lambda: {"fail": 0, "stall": 0, "crash": 0, "refuse": 0})

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply fields from an admin request; names and values are checked."""
        for name, value in changes.items():
            if name == "refuse_s":
                continue  # handled by the server (it owns the socket)
            if name not in FAULT_FIELDS:
                raise ValueError(f"unknown fault field {name!r}; known: {', '.join(FAULT_FIELDS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"fault field {name!r} must be a non-negative number, got {value!r}")
            if name.endswith("_rate") and value > 1:
                raise ValueError(f"fault field {name!r} is a probability, got {value!r}")
            if name == "slowdown" and value <= 0:
                raise ValueError(f"fault field 'slowdown' must be positive, got {value!r}")
            setattr(self, name, type(getattr(self, name))(value))
            if name == "seed":
                self._rng = random.Random(int(value))

    def draw(self) -> str | None:
        """The fault for the next request: "fail", "stall", "crash" or None."""
        for kind in ("fail", "stall", "crash"):
            if getattr(self, f"{kind}_next") > 0:
                setattr(self, f"{kind}_next", getattr(self, f"{kind}_next") - 1)
                self.injected[kind] += 1
                return kind
        if self.fail_rate or self.stall_rate or self.crash_rate:
            x = self._rng.random()
            for kind in ("fail", "stall", "crash"):
                rate = getattr(self, f"{kind}_rate")
                if x < rate:
                    self.injected[kind] += 1
                    return kind
                x -= rate
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return data
