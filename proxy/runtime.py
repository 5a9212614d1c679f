"""Event-loop plumbing shared by the long-running commands (serve, sim)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_until_signal(start: Callable[[], Awaitable[object]], stop: Callable[[], Awaitable[None]],
                     use_uvloop: bool = True) -> int:
    """Run ``start`` then wait for SIGINT/SIGTERM, then ``stop`` (uvloop when installed)."""

    async def body() -> None:
        await start()
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        try:
            await done.wait()
        finally:
            await stop()

    if use_uvloop:
        try:
            import uvloop

            uvloop.run(body())
            return 0
        except ImportError:
            pass
    asyncio.run(body())
    return 0
