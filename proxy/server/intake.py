"""Reading a client's request body and preparing it, large ones off the event loop.

The body must arrive within ``--body-timeout`` seconds (408 otherwise: a client that sends its
body a byte at a time holds nothing for long) and within ``--max-body-bytes`` (413).
Bodies of ``--offload-bytes`` or more (by their Content-Length) are prepared (parsed,
tokenized, hashed, re-encoded: over 1 s of CPU for a 15 MB prompt) in a pool of
``--prompt-workers`` processes, so the loop keeps serving everyone else meanwhile; a thread
would not do, since that work holds the GIL. The workers run at niceness +10, so on a busy
machine the event loop gets the CPU first. Such a body is read straight into shared memory
and large payloads come back the same way (through a pipe, 15 MB take hundreds of GIL
hand-offs that stall the loop). The pool starts on first use (``warm()`` starts it at once)
and restarts if a worker dies. As with any spawned worker, a script that embeds the proxy
needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory

from proxy.server.front import Request
from proxy.server.prepare import Prepared, PrepareSpec, prepare
from proxy.wire.openai import RequestError
from proxy.wire.tokens import make_tokenizer
from scheduling.block_hash import BlockHasher

log = logging.getLogger("omni_proxy")

SHARED_BYTES = 1 << 20  # payloads above this come back from a worker in shared memory
WORKER_NICENESS = 10

_worker: tuple | None = None  # (spec, tokenizer, hasher) inside a worker process
_PAYLOADS = ("payload", "decode_base", "prefill_payload")


def _init_worker(spec: PrepareSpec) -> None:
    global _worker
    try:  # preparing prompts is batch work: the event loop's process comes first for the CPU
        os.nice(WORKER_NICENESS)
    except OSError:
        pass
    _worker = (spec, make_tokenizer(spec.tokenizer, spec.chars_per_token),
               BlockHasher(spec.block_size, spec.hash_algo, spec.hash_seed))


def _to_shared(data: bytes) -> str:  # in a worker: a large payload going back
    shm = shared_memory.SharedMemory(create=True, size=max(1, len(data)))
    shm.buf[: len(data)] = data
    name = shm.name
    shm.close()
    return name


def _from_shared(name: str, size: int, unlink: bool) -> bytes:
    shm = shared_memory.SharedMemory(name=name)
    try:
        return bytes(shm.buf[:size])
    finally:
        shm.close()
        if unlink:  # also tells the (shared) resource tracker; attaching only re-registered the name
            shm.unlink()


def _prepare_in_worker(name: str, size: int, chat: bool) -> Prepared:
    """``prepare`` on a body handed over in shared memory; large payloads go back the same way."""
    spec, tokenizer, hasher = _worker
    prepared = prepare(_from_shared(name, size, unlink=False), chat, spec, tokenizer, hasher)
    for field in _PAYLOADS:
        data = getattr(prepared, field)
        if data is not None and len(data) > SHARED_BYTES:
            setattr(prepared, field, (_to_shared(data), len(data)))
    return prepared


def _noop() -> None:
    return None


class SharedBody:
    """A large request body read straight into shared memory, chunk by chunk as it arrives
    (so filling fresh pages costs the loop nothing at once), for a worker to read."""

    def __init__(self, size: int):
        self.shm = shared_memory.SharedMemory(create=True, size=max(1, size))
        self.capacity = size
        self.size = 0

    def append(self, chunk: bytes) -> None:
        end = self.size + len(chunk)
        if end > self.capacity:
            raise RequestError(f"request body is longer than its Content-Length ({self.capacity} bytes)")
        self.shm.buf[self.size:end] = chunk
        self.size = end

    def __len__(self) -> int:
        return self.size

    def to_bytes(self) -> bytes:
        return bytes(self.shm.buf[: self.size])

    def close(self) -> None:
        self.shm.close()
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass


class Intake:
    def __init__(self, spec: PrepareSpec, *, max_body_bytes: int, body_timeout: float, offload_bytes: int,
                 workers: int):
        self.spec = spec
        self.tokenizer = make_tokenizer(spec.tokenizer, spec.chars_per_token)
        self.hasher = BlockHasher(spec.block_size, spec.hash_algo, spec.hash_seed)
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.offload_bytes = offload_bytes
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def offloads(self, size: int) -> bool:
        return 0 < self.offload_bytes <= size

    async def read(self, request: Request) -> bytes | SharedBody:
        """The body: bytes, or a SharedBody when it is large enough to be prepared in a worker."""
        limit = self.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise RequestError(f"request body is {length} bytes, over the limit of {limit} bytes (--max-body-bytes)", 413)
        offload = length is not None and self.offloads(length)
        if not offload:
            whole = request.take_complete()  # the usual case: the body came with the head
            if whole is not None:
                if len(whole) > limit:
                    raise self._too_large()
                return whole
        try:
            async with asyncio.timeout(self.body_timeout):
                if not offload:
                    try:
                        return await request.read(limit)
                    except ValueError:  # a chunked body (no Content-Length) past the limit
                        raise self._too_large() from None
                body = SharedBody(length)
                try:
                    while chunk := await request.readany():
                        body.append(chunk)
                except BaseException:
                    body.close()
                    raise
                return body
        except TimeoutError:
            raise RequestError(f"request body not received within {self.body_timeout:g} s (--body-timeout)", 408) from None

    def _too_large(self) -> RequestError:
        return RequestError(f"request body is over the limit of {self.max_body_bytes} bytes (--max-body-bytes)", 413)

    async def read_bytes(self, request: Request) -> bytes:
        body = await self.read(request)
        if isinstance(body, SharedBody):
            try:
                return body.to_bytes()
            finally:
                body.close()
        return body

    async def prepare(self, body: bytes | SharedBody, chat: bool) -> Prepared:
        """Prepared request; from a SharedBody (which this closes) in a worker process, and then
        ``payload`` is always set (the client's bytes are not kept otherwise)."""
        if not isinstance(body, SharedBody):
            return prepare(body, chat, self.spec, self.tokenizer, self.hasher)
        loop = asyncio.get_running_loop()
        try:
            prepared = await loop.run_in_executor(self._executor(), _prepare_in_worker, body.shm.name, body.size, chat)
            for field in _PAYLOADS:
                value = getattr(prepared, field)
                if isinstance(value, tuple):
                    setattr(prepared, field, _from_shared(*value, unlink=True))
            if self.spec.mode != "pd" and prepared.payload is None:
                prepared.payload = body.to_bytes()
            return prepared
        except BrokenProcessPool:
            log.error("a prompt worker process died; restarting the pool")
            self._pool = None
            raise RequestError("the proxy's prompt worker failed on this request", 500) from None
        finally:
            body.close()

    def warm(self) -> None:
        """Start the worker pool now rather than on the first large request."""
        if self.offload_bytes > 0:
            self._executor().submit(_noop)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the proxy has threads (ZMQ, executors) that a fork would copy mid-state
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.spec,))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
