"""Fault injection for the simulated engine.

Per request, one fault at most, in this order (counters ``KIND_next`` first, then rates
``KIND_rate`` drawn from a seeded generator):

* ``fail``:     HTTP 500 with a JSON error, before any byte of a completion;
* ``html``:     HTTP 500 with an HTML page naming internal hosts (what a broken gateway sends);
* ``garbage``:  HTTP 200 with a body that is not JSON (a stream: not SSE either);
* ``stall``:    accept the request and never answer (until the client goes away);
* ``hang``:     start answering, then go silent with the connection open (a stream after
  ``after_tokens`` tokens; a whole answer after half its body);
* ``crash``:    reset the connection after ``after_tokens`` generated tokens (mid-stream for
  streams; before the answer for the others);
* ``truncate``: end the answer early but cleanly (a stream in the middle of an event after
  ``after_tokens`` tokens; a whole answer shorter than its Content-Length);

and for the whole instance:

* ``slowdown``: multiply every engine step time by this factor (1.0 = normal);
* ``refuse``:   stop listening for ``refuse_s`` seconds (connection refused) and reset requests
  that arrive on connections already open.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("fail", "html", "garbage", "stall", "hang", "crash", "truncate")
FAULT_FIELDS = tuple(f"{k}_{what}" for k in KINDS for what in ("next", "rate")) + (
    "after_tokens", "slowdown", "refuse_s", "seed")


@dataclass
class FaultPlan:
    fail_next: int = 0
    fail_rate: float = 0.0
    html_next: int = 0
    html_rate: float = 0.0
    garbage_next: int = 0
    garbage_rate: float = 0.0
    stall_next: int = 0
    stall_rate: float = 0.0
    hang_next: int = 0
    hang_rate: float = 0.0
    crash_next: int = 0
    crash_rate: float = 0.0
    truncate_next: int = 0
    truncate_rate: float = 0.0
    after_tokens: int = 2
    slowdown: float = 1.0
    seed: int = 0
    injected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS + ("refuse",), 0))

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self.check()

    def check(self) -> None:
        for name in FAULT_FIELDS:
            if name == "refuse_s":
                continue
            value = getattr(self, name)
            if name.endswith("_rate") and not 0 <= value <= 1:
                raise ValueError(f"fault field {name!r} is a probability, got {value!r}")
        if sum(getattr(self, f"{k}_rate") for k in KINDS) > 1:
            raise ValueError("fault rates add up to more than 1")
        if self.slowdown <= 0:
            raise ValueError(f"fault field 'slowdown' must be positive, got {self.slowdown!r}")

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
        """The fault for the next request: one of KINDS or None."""
        for kind in KINDS:
            left = getattr(self, f"{kind}_next")
            if left > 0:
                setattr(self, f"{kind}_next", left - 1)
                self.injected[kind] += 1
                return kind
        rates = [getattr(self, f"{kind}_rate") for kind in KINDS]
        if any(rates):
            x = self._rng.random()
            for kind, rate in zip(KINDS, rates):
                if x < rate:
                    self.injected[kind] += 1
                    return kind
                x -= rate
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
