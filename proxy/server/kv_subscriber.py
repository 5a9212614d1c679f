"""Subscribes to an instance's vLLM KV event stream and applies it to the prefix index.

One SUB socket per instance (``--kv-events URL=ENDPOINT``), reading (topic, seq, payload)
messages; sequence gaps are counted (events published before the socket connected, or
dropped at the publisher's high-water mark, are lost; the index then corrects itself through
later events and the expiry of routing-time guesses).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from proxy.wire import kv_events as kv
from scheduling.block_hash import to_key
from scheduling.prefix_index import PrefixIndex

log = logging.getLogger("omni_proxy")


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
        self._task: asyncio.Task | None = None
        self._socket = None

    def start(self) -> None:
        import zmq
        import zmq.asyncio

        self._socket = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, self.topic)
        self._socket.connect(self.endpoint)
        self.index.set_events(self.instance, True)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-events {self.instance}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._socket is not None:
            self._socket.close(linger=0)

    async def _run(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                self.handle(frames)
            except kv.KVEventDecodeError as exc:
                self.bad_messages += 1
                if self.bad_messages <= 3:
                    log.warning("KV events from %s (%s): %s", self.instance, self.endpoint, exc)

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
