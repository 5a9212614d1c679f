"""Subscribes to an instance's vLLM KV event stream and applies it to the prefix index.

One SUB socket per instance (``--kv-events URL=ENDPOINT``), reading (topic, seq, payload)
messages; sequence gaps are counted (events published before the socket connected, or
dropped at the publisher's high-water mark, are lost; the index then corrects itself through
later events and the expiry of routing-time guesses).

The socket is a plain (synchronous) ZMQ socket read from a reader callback on its file
descriptor, which drains every waiting message in one go (at most ``DRAIN`` per loop turn).
``zmq.asyncio`` made a future and a poll round per message: with events after every engine
step, that was a tenth of the proxy's event loop at 200 req/s (docs/serving_bench.md). ZMQ's
descriptor is edge-triggered: it signals that the socket's state changed, not that a message
waits, so each wake-up reads until ``EVENTS`` shows nothing more.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from proxy.wire import kv_events as kv
from scheduling.block_hash import to_key
from scheduling.prefix_index import PrefixIndex

log = logging.getLogger("omni_proxy")

DRAIN = 256  # messages applied per loop turn at most; the rest on the next turn
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
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        global _zmq
        import zmq

        _zmq = zmq
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, self.topic)
        self._socket.connect(self.endpoint)
        self.index.set_events(self.instance, True)
        self._loop = asyncio.get_running_loop()
        self._fd = self._socket.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._drain)
        self._loop.call_soon(self._drain)  # messages may be waiting already: the edge has passed

    async def stop(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _drain(self) -> None:
        zmq = _zmq
        sock = self._socket
        if sock is None:
            return
        for _ in range(DRAIN):
            try:
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # the socket was closed under us
                log.warning("KV events from %s (%s): %s", self.instance, self.endpoint, exc)
                return
            try:
                self.handle(frames)
            except kv.KVEventDecodeError as exc:
                self.bad_messages += 1
                if self.bad_messages <= 3:
                    log.warning("KV events from %s (%s): %s", self.instance, self.endpoint, exc)
        self._loop.call_soon(self._drain)  # more may wait: go on after the others had their turn

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
