"""Upstream instances, their health, and the registry the proxy routes over.

Two verdicts decide whether an instance gets requests, and they are kept apart:

* **down** (the prober's): ``--health-misses`` probes in a row failed or went unanswered; a
  passing probe lifts it. This is how a silent instance (alive but not answering) is found: a
  non-streaming answer's first byte comes only at its end, so no per-request timer can tell.
* **the circuit breaker** (requests'): ``--breaker-failures`` failed requests in a row open it
  for a cooldown (doubling on each reopening, up to 60 s); then it is half-open and lets one
  trial request through at a time: its success closes the circuit, its failure reopens it. A
  passing ``/health`` does not close it: an instance can answer probes and fail every request.

When either verdict turns against an instance, the registry calls ``on_down(url, reason)``
(the proxy then fails over the requests in flight there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Request-failure breaker: closed -> open -> half-open (one trial at a time) -> closed."""

    def __init__(self, failures: int = 3, cooldown_s: float = 5.0, max_cooldown_s: float = 60.0):
        if failures < 1:
            raise ValueError(f"breaker failures must be at least 1, got {failures}")
        self.threshold = failures
        self.base_cooldown = cooldown_s
        self.max_cooldown = max_cooldown_s
        self.state = CLOSED
        self.consecutive = 0
        self.open_until = 0.0
        self._cooldown = cooldown_s
        self.trips = 0
        self.trial = False  # a half-open trial request is in flight

    def usable(self, now: float) -> bool:
        if self.state == OPEN and now >= self.open_until:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN:
            return not self.trial
        return self.state == CLOSED

    def dispatched(self) -> None:
        """A request was sent: in half-open state it is the trial."""
        if self.state == HALF_OPEN:
            self.trial = True

    def record_success(self, now: float) -> None:
        if self.state == HALF_OPEN:
            self.state = CLOSED
            self._cooldown = self.base_cooldown
        self.trial = False
        if self.state == CLOSED:
            self.consecutive = 0

    def record_failure(self, now: float) -> bool:
        """Count a failed request; True if the circuit opened now."""
        self.consecutive += 1
        if self.state == HALF_OPEN:
            self._cooldown = min(self.max_cooldown, self._cooldown * 2)
        elif self.state != CLOSED or self.consecutive < self.threshold:
            return False
        self.state = OPEN
        self.trial = False
        self.open_until = now + self._cooldown
        self.trips += 1
        return True

    def end_trial(self) -> None:
        """The trial ended without a verdict (client gone, instance down): let another through."""
        self.trial = False


@dataclass
class Instance:
    url: str
    role: str  # "prefill", "decode" or "collocated"
    kv_endpoint: str | None = None
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    down: bool = False           # the prober's verdict
    probe_misses: int = 0
    last_health_ok: bool | None = None
    last_error: str | None = None

    def usable(self, now: float) -> bool:
        return not self.down and self.breaker.usable(now)

    def state(self) -> str:
        return "down" if self.down else self.breaker.state


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"instance URL must start with http:// or https://, got {url!r}")
    return url


class Registry:
    def __init__(self, on_down: Callable[[str, str], None] | None = None, health_misses: int = 3) -> None:
        self.instances: dict[str, Instance] = {}
        self.on_down = on_down or (lambda url, reason: None)
        self.health_misses = health_misses

    def add(self, instance: Instance) -> None:
        if instance.url in self.instances:
            raise ValueError(f"instance {instance.url} is already registered (as {self.instances[instance.url].role})")
        self.instances[instance.url] = instance

    def remove(self, url: str) -> Instance:
        try:
            return self.instances.pop(url)
        except KeyError:
            raise KeyError(f"no instance {url} is registered") from None

    def of_role(self, role: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.role == role]

    def usable(self, role: str, now: float) -> list[str]:
        return [i.url for i in self.instances.values() if i.role == role and i.usable(now)]

    # -- verdicts -------------------------------------------------------------------------------
    def request_failed(self, url: str, now: float, why: str) -> None:
        inst = self.instances.get(url)
        if inst is None:
            return
        inst.last_error = why
        if inst.breaker.record_failure(now):
            self.on_down(url, f"circuit opened after {inst.breaker.consecutive} failed request(s)")

    def request_succeeded(self, url: str, now: float) -> None:
        inst = self.instances.get(url)
        if inst is not None:
            inst.breaker.record_success(now)

    def probed(self, url: str, ok: bool, why: str | None = None) -> None:
        inst = self.instances.get(url)
        if inst is None:
            return
        inst.last_health_ok = ok
        if ok:
            inst.probe_misses = 0
            inst.down = False
            return
        inst.last_error = why
        inst.probe_misses += 1
        if not inst.down and inst.probe_misses >= self.health_misses:
            inst.down = True
            self.on_down(url, f"{inst.probe_misses} health probes in a row failed ({why})")
