"""Upstream instances, their circuit breakers, and the registry the proxy routes over."""

from __future__ import annotations

from dataclasses import dataclass, field

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Stops sending to an instance after ``failures`` consecutive failures.

    Open for ``cooldown_s`` (doubling on each reopening, up to ``max_cooldown_s``). After the
    cooldown a successful health check closes it; without health checks it goes half-open and
    the next request decides (success closes, failure reopens).
    """

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

    def usable(self, now: float, health_checked: bool = True) -> bool:
        if self.state == CLOSED or self.state == HALF_OPEN:
            return True
        if not health_checked and now >= self.open_until:
            self.state = HALF_OPEN
            return True
        return False

    def record_success(self, now: float, from_health: bool = False) -> None:
        if self.state == OPEN and now < self.open_until:
            return  # still cooling down: one good probe does not end it early
        if self.state != CLOSED:
            self._cooldown = self.base_cooldown
        self.state = CLOSED
        self.consecutive = 0

    def record_failure(self, now: float) -> None:
        self.consecutive += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.consecutive >= self.threshold):
            if self.state == HALF_OPEN:
                self._cooldown = min(self.max_cooldown, self._cooldown * 2)
            self.state = OPEN
            self.open_until = now + self._cooldown
            self.trips += 1
        elif self.state == OPEN:
            self.open_until = max(self.open_until, now + self._cooldown)


@dataclass
class Instance:
    url: str
    role: str  # "prefill", "decode" or "collocated"
    kv_endpoint: str | None = None
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    last_health_ok: bool | None = None
    last_error: str | None = None


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"instance URL must start with http:// or https://, got {url!r}")
    return url


class Registry:
    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}

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

    def usable(self, role: str, now: float, health_checked: bool) -> list[str]:
        return [i.url for i in self.instances.values() if i.role == role and i.breaker.usable(now, health_checked)]
