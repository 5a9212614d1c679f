"""Reading a client's request body and preparing it, large ones off the event loop.

The body must arrive within ``--body-timeout`` seconds (408 otherwise: a client that sends its
body a byte at a time holds nothing for long) and within ``--max-body-bytes`` (413).
Bodies of ``--offload-bytes`` or more are prepared (parsed, tokenized, hashed, re-encoded:
about 1 s of CPU for a 15 MB prompt) in a pool of ``--prompt-workers`` processes, so the loop
keeps serving everyone else meanwhile; a thread would not do, since that work holds the GIL.
The pool starts on first use (``warm()`` starts it at once) and restarts if a worker dies.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from aiohttp import web

from proxy.server.prepare import Prepared, PrepareSpec, prepare
from proxy.wire.openai import RequestError
from proxy.wire.tokens import make_tokenizer
from scheduling.block_hash import BlockHasher

log = logging.getLogger("omni_proxy")

_worker: tuple | None = None  # (spec, tokenizer, hasher) inside a worker process


def _init_worker(spec: PrepareSpec) -> None:
    global _worker
    _worker = (spec, make_tokenizer(spec.tokenizer, spec.chars_per_token),
               BlockHasher(spec.block_size, spec.hash_algo, spec.hash_seed))


def _prepare_in_worker(raw: bytes, chat: bool) -> Prepared:
    spec, tokenizer, hasher = _worker
    return prepare(raw, chat, spec, tokenizer, hasher)


def _noop() -> None:
    return None


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
        self.offloaded = 0
        self._pool: ProcessPoolExecutor | None = None

    async def read(self, request: web.Request) -> bytes:
        limit = self.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise RequestError(f"request body is {request.content_length} bytes, over the limit of {limit} bytes "
                               f"(--max-body-bytes)", 413)
        try:
            async with asyncio.timeout(self.body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise RequestError(f"request body is over the limit of {limit} bytes (--max-body-bytes)", 413) from None
        except TimeoutError:
            raise RequestError(f"request body not received within {self.body_timeout:g} s (--body-timeout)", 408) from None

    async def prepare(self, raw: bytes, chat: bool) -> Prepared:
        if self.offload_bytes <= 0 or len(raw) < self.offload_bytes:
            return prepare(raw, chat, self.spec, self.tokenizer, self.hasher)
        self.offloaded += 1
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor(), _prepare_in_worker, raw, chat)
        except BrokenProcessPool:
            log.error("a prompt worker process died; restarting the pool")
            self._pool = None
            raise RequestError("the proxy's prompt worker failed on this request", 500) from None

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
