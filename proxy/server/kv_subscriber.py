"""Subscribes to an instance's vLLM KV event stream and applies it to the prefix index.

One SUB socket per instance (``--kv-events URL=ENDPOINT``), reading (topic, seq, payload)
messages; sequence gaps are counted (events published before the socket connected, or
dropped at the publisher's high-water mark, are lost; the index then corrects itself through
later events and the expiry of routing-time guesses).

Events are applied when a decision needs them and on a timer, not as they arrive: the
socket is a plain (synchronous) ZMQ socket that :meth:`KVEventSubscriber.drain` empties
without waiting, called by the router before every decision (``Router.state``) and by the
server's housekeeping every 0.1 s. So every decision sees every event received until then,
and the event loop is not woken once per engine step: on this project's 2-core VM a wake-up
costs tens of microseconds of CPU, and with ``zmq.asyncio`` (a future and a poll round per
message) KV events were a tenth of the proxy's loop at 200 req/s (docs/serving_bench.md).

A drain that finds nothing must be cheap, since every decision makes one: ZMQ's descriptor
is edge-triggered (readable when the socket's state may have changed), so once ``EVENTS``
has shown the socket empty, a drain only polls the descriptor (well under a microsecond)
until it turns readable again; asking ZMQ itself costs microseconds (and a ``recv`` that
finds nothing raises).
"""

from __future__ import annotations

import asyncio
import logging
import select
from typing import Callable

from proxy.wire import kv_events as kv
from scheduling.block_hash import to_key
from scheduling.prefix_index import PrefixIndex

log = logging.getLogger("omni_proxy")

DRAIN = 4096  # messages applied per drain at most (a flood waits for the next one)
RCVHWM = 100_000  # messages ZMQ keeps for us between drains
_zmq = None  # imported by the first start(): the proxy imports without pyzmq


class KVEventSubscriber:
    def __init__(self, instance: str, endpoint: str, index: PrefixIndex, block_size: int,
                 topic: str = "", on_event: Callable[[str, str], None] | None = None):
        self.instance = instance
        self.endpoint = endpoint
        self.index = index
        self.block_size = block_size
        self.topic = topic.encode()
        self.on_event = on_event
        self.last_seq: int | None = None
        self.gaps = 0
        self.bad_messages = 0
        self.batches = 0
        self._warned_block_size = False
        self._socket = None
        self._poll: select.poll | None = None
        self._maybe = True  # the socket may hold messages (False: EVENTS showed it empty since)

    def start(self) -> None:
        global _zmq
        import zmq

        _zmq = zmq
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, RCVHWM)
        self._socket.setsockopt(zmq.SUBSCRIBE, self.topic)
        self._socket.connect(self.endpoint)
        self._poll = select.poll()
        self._poll.register(self._socket.getsockopt(zmq.FD), select.POLLIN)
        self._maybe = True
        self.index.set_events(self.instance, True)

    async def stop(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
            self._poll = None

    def drain(self) -> int:
        """Apply the messages waiting on the socket (none: one cheap check); how many."""
        sock = self._socket
        if sock is None or not (self._maybe or self._poll.poll(0)):
            return 0
        zmq = _zmq
        for n in range(DRAIN):
            try:
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._maybe = False  # until the descriptor signals a change
                    return n
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # the socket was closed under us
                log.warning("KV events from %s (%s): %s", self.instance, self.endpoint, exc)
                return n
            try:
                self.handle(frames)
            except kv.KVEventDecodeError as exc:
                self.bad_messages += 1
                if self.bad_messages <= 3:
                    log.warning("KV events from %s (%s): %s", self.instance, self.endpoint, exc)
        self._maybe = True  # a flood: the rest next time
        return DRAIN

    def handle(self, frames: list[bytes]) -> None:
        """Apply one message (exposed for tests: no socket needed)."""
        if len(frames) != 3:
            raise kv.KVEventDecodeError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
        seq = kv.decode_seq(frames[1])
        if self.last_seq is not None and seq != self.last_seq + 1:
            self.gaps += 1
        self.last_seq = seq
        batch = kv.decode_batch(frames[2])
        self.batches += 1
        for event in batch.events:
            self.apply(event)

    def apply(self, event: kv.Event) -> None:
        if isinstance(event, kv.BlockStored):
            if event.block_size != self.block_size and not self._warned_block_size:
                self._warned_block_size = True
                log.warning("instance %s stores blocks of %d tokens but the proxy hashes blocks of %d "
                            "(--block-size): prefix matches on it will miss", self.instance,
                            event.block_size, self.block_size)
            self.index.stored(self.instance, [to_key(h) for h in event.block_hashes])
            kind = "BlockStored"
        elif isinstance(event, kv.BlockRemoved):
            self.index.removed(self.instance, [to_key(h) for h in event.block_hashes])
            kind = "BlockRemoved"
        else:
            self.index.cleared(self.instance)
            kind = "AllBlocksCleared"
        if self.on_event is not None:
            self.on_event(self.instance, kind)
