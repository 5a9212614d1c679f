"""Relaying an upstream SSE stream to the client, always as well-formed events.

Only complete events are written (a chunk's incomplete tail waits for its end), so when the
upstream breaks, whatever it was writing is dropped and the client's stream ends with one
error event and the dialect's end (``data: [DONE]`` for completions; an ``error`` event for the
Responses API), every event parseable. A stream counts as complete only if its last event is
the dialect's final one; one that ends otherwise is broken too.

The relay's waits are watched (:class:`proxy.server.attempts.Watchdog`): ``--idle-timeout``
without an upstream event (or the grace period once the instance is believed down), and the
same limit for a client that stops reading (the connection is then closed).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from proxy.server.attempts import Attempt, Call, Watchdog
from proxy.server.front import Stream
from proxy.server.upstream import MAX_EVENT
from proxy.wire.openai import SSE_DONE, error_body, events_end, sse_event

log = logging.getLogger("omni_proxy")


@dataclass(frozen=True)
class Dialect:
    """How a stream of one API ends, and how it is ended with an error."""

    terminal: Callable[[bytes], bool]   # is the last event of this chunk the final one
    error: Callable[[str], bytes]       # the events that end a broken stream


def _last_event(chunk: bytes) -> bytes:
    lf = chunk.rfind(b"\n\n", 0, len(chunk) - 2)
    crlf = chunk.rfind(b"\r\n\r\n", 0, len(chunk) - 4)
    return chunk[max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0):]


COMPLETIONS = Dialect(
    terminal=lambda chunk: chunk.endswith((b"data: [DONE]\n\n", b"data: [DONE]\r\n\r\n")),
    error=lambda message: sse_event(error_body(message, 502, "upstream_error")) + SSE_DONE)

_RESPONSES_FINAL = (b"event: response.completed", b"event: response.failed", b"event: response.incomplete",
                    b"event: error")
RESPONSES = Dialect(
    terminal=lambda chunk: _last_event(chunk).startswith(_RESPONSES_FINAL),
    error=lambda message: b"event: error\ndata: " + json.dumps(
        {"type": "error", "code": "upstream_error", "message": message, "param": None}).encode() + b"\n\n")


@dataclass
class Relayed:
    ok: bool
    events: int
    usage: dict | None = None
    why: str | None = None


async def relay(call: Call, attempt: Attempt, resp, out: Stream,
                first: bytes, pending: bytes, dialect: Dialect, write_idle_s: float,
                grow: Callable[[int], None]) -> Relayed:
    """Write ``first`` and then the rest of the upstream stream to ``out``.

    Returns how it ended; raises ConnectionResetError if the client went away.
    """
    loop = asyncio.get_running_loop()
    events = first.count(b"data: ")
    grow(events)
    done = dialect.terminal(first)
    last, before = first, b""
    why = None
    try:
        async with asyncio.timeout(None) as timer:
            dog = Watchdog(attempt, timer, write_idle_s)
            try:
                while True:
                    attempt.waiting_since = loop.time()
                    try:
                        chunk = await resp.content.readany()
                    except (aiohttp.ClientError, OSError) as exc:  # aiohttp: instances not on http://
                        why = f"upstream broke: {type(exc).__name__}: {exc}"
                        break
                    attempt.waiting_since = None
                    if not chunk:
                        break
                    if pending:
                        chunk, pending = pending + chunk, b""
                    if not chunk.endswith(b"\n\n"):
                        end = events_end(chunk)
                        chunk, pending = chunk[:end], chunk[end:]
                        if len(pending) > MAX_EVENT:
                            why = f"an event over {MAX_EVENT} bytes"
                            break
                        if not chunk:
                            continue
                    done = dialect.terminal(chunk)
                    attempt.writing_since = loop.time()
                    # the final event with the upstream body at its end: the stream's end goes with it
                    await out.write(chunk, last=done and not pending and resp.content.at_eof())
                    attempt.writing_since = None
                    n = chunk.count(b"data: ")
                    events += n
                    grow(n)
                    before, last = last, chunk
            finally:
                dog.stop()
    except TimeoutError:
        if dog.fired == "client":
            log.warning("request %s: client stopped reading for %g s; closing", call.rid, write_idle_s)
            raise ConnectionResetError("client stopped reading") from None
        why = (f"instance believed down ({attempt.down_reason})" if attempt.down_reason
               else f"no data for {attempt.idle_s:g} s")
    if why is None and pending.strip():
        why = "stream cut in the middle of an event"
    elif why is None and not done:
        why = "stream ended without its final event"
    if why is None:
        return Relayed(True, events, _usage(before + last))
    log.warning("request %s: stream from %s broke after %d event(s): %s", call.rid, attempt.instance, events, why)
    await out.write(dialect.error(f"the upstream instance failed mid-stream; this answer is incomplete "
                                  f"(request id {call.rid})"))
    return Relayed(False, events, None, why)


def _usage(tail: bytes) -> dict | None:
    """The ``usage`` object of the last event that has one (streams with ``include_usage``)."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    start = max(tail.rfind(b"data: ", 0, at), 0)
    end = tail.find(b"\n", at)
    try:
        doc = json.loads(tail[start + 6:end if end >= 0 else None])
    except (ValueError, UnicodeDecodeError):
        return None
    usage = doc.get("usage") if isinstance(doc, dict) else None
    return usage if isinstance(usage, dict) else None
