"""How serving a request can fail, and what the client is told (never the upstream's words).

Placement fails with :class:`NoInstance` (nothing usable to send to) or :class:`NoCapacity`
(held in the proxy past ``--queue-timeout``); an upstream attempt with :class:`AttemptFailed`
(retryable) or :class:`UpstreamRejected` (the request is at fault); a request whose every
attempt failed with :class:`AllAttemptsFailed`.

Upstream error bodies, instance URLs and exception texts go to the log, tagged with the request
id; the client gets an OpenAI-shaped error that carries the request id and nothing internal.
"""

from __future__ import annotations

from proxy.server.front import Answer
from proxy.wire.openai import error_bytes

__all__ = ["AttemptFailed", "UpstreamRejected", "AllAttemptsFailed", "NoInstance", "NoCapacity", "client_error"]

# kinds of AttemptFailed; all but "down" count against the instance's circuit breaker
KINDS = ("connect", "timeout", "http_5xx", "broken", "bad_response", "stream_broken", "down")


class NoInstance(Exception):
    """No usable instance for a stage (none configured, or every breaker open)."""


class NoCapacity(Exception):
    """Held past the queue timeout."""


class AttemptFailed(Exception):
    """One upstream attempt failed before any byte reached the client (so it can be retried)."""

    def __init__(self, instance: str, kind: str, detail: str):
        super().__init__(f"{instance}: {kind}: {detail}")
        self.instance = instance
        self.kind = kind
        self.detail = detail

    @property
    def counts(self) -> bool:
        return self.kind != "down"  # the instance is already known to be down


class UpstreamRejected(Exception):
    """The instance answered 4xx: the request is at fault. ``body`` is what the client gets."""

    def __init__(self, status: int, body: bytes):
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body


class AllAttemptsFailed(Exception):
    def __init__(self, failures: list[AttemptFailed]):
        super().__init__("; ".join(str(f) for f in failures))
        self.failures = failures


def client_error(message: str, status: int, rid: str | None, kind: str | None = None,
                 param: str | None = None) -> Answer:
    """An OpenAI-style error answer; the request id goes into the message and the header."""
    if rid:
        message = f"{message} (request id {rid})"
    return Answer(status, error_bytes(message, status, kind, param), headers=(("X-Request-Id", rid),) if rid else None)
