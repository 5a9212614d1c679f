"""The health prober: ``GET /health`` on every instance, each on its own cadence.

A probe starts every ``--health-interval`` seconds (right after the last one if that took
longer) and may take ``--health-timeout`` seconds; ``--health-misses`` failed probes in a row
declare the instance down (``Registry.probed``), the next passing probe lifts that. With the
defaults (2 s, 2 s, 3) a silent instance is declared down at most
``interval + misses * max(interval, timeout)`` = 8 s after it went silent, and the requests
waiting on it are failed over then. One task per instance, so a silent instance does not slow
the probes of the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from proxy.server.instances import Registry


def detection_bound_s(interval: float, timeout: float, misses: int) -> float:
    """Longest time from an instance going silent to its being declared down."""
    return interval + misses * max(interval, timeout)


class HealthProber:
    def __init__(self, registry: Registry, session: Callable[[], aiohttp.ClientSession], interval: float,
                 timeout: float, on_probe: Callable[[], None] | None = None):
        self.registry = registry
        self.session = session
        self.interval = interval
        self.timeout = timeout
        self.on_probe = on_probe or (lambda: None)
        self._tasks: dict[str, asyncio.Task] = {}

    def watch(self, url: str) -> None:
        if self.interval > 0 and url not in self._tasks:
            self._tasks[url] = asyncio.get_running_loop().create_task(self._loop(url), name=f"probe {url}")

    async def unwatch(self, url: str) -> None:
        task = self._tasks.pop(url, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def stop(self) -> None:
        for url in list(self._tasks):
            await self.unwatch(url)

    async def _loop(self, url: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            ok, why = await self.probe(url)
            self.registry.probed(url, ok, why)
            self.on_probe()
            await asyncio.sleep(max(0.0, started + self.interval - loop.time()))

    async def probe(self, url: str) -> tuple[bool, str | None]:
        try:
            async with asyncio.timeout(self.timeout):
                async with self.session().get(url + "/health") as r:
                    await r.read()
                    return r.status == 200, None if r.status == 200 else f"health check answered {r.status}"
        except TimeoutError:
            return False, f"health check unanswered in {self.timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return False, f"health check failed: {type(exc).__name__}"
