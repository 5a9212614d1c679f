"""CPU use of the benchmark's processes and of the whole machine, sampled from /proc (Linux).

CPU shares are in percent of one core (a process using two cores fully shows 200 %); the
machine share is busy time over all cores, in percent of one core too, so on a 2-core
machine 200 % means the CPU ceiling. ``others`` is the machine's busy time not spent in the
watched processes: other tenants of a shared machine.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the ")": state is field 3; utime and stime are fields 14 and 15. Reaped children's
    # time (cutime, cstime) is left out: the bench process reaps the routers it started.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds over all cores since boot (steal counts as busy: not ours)."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
    except OSError:
        return None
    values = [int(v) for v in parts[:8]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values)
    return (total - idle) / _TICKS, total / _TICKS


@dataclass
class CpuMonitor:
    """Samples every ``interval`` seconds while running; ``summary()`` gives mean and peak."""

    pids: dict[str, int]
    interval: float = 0.5
    samples: dict[str, list[float]] = field(default_factory=dict)
    _task: asyncio.Task | None = None

    def start(self) -> "CpuMonitor":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> dict:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        return self.summary()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        prev_t = loop.time()
        prev = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}
        prev_m = machine_busy_seconds()
        while True:
            await asyncio.sleep(self.interval)
            now = loop.time()
            dt = max(now - prev_t, 1e-6)
            cur = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}
            ours = 0.0
            for name, value in cur.items():
                if value is not None and prev.get(name) is not None:
                    share = 100.0 * (value - prev[name]) / dt
                    self.samples.setdefault(name, []).append(share)
                    ours += share
            cur_m = machine_busy_seconds()
            if cur_m is not None and prev_m is not None:
                total = cur_m[1] - prev_m[1]
                cores = os.cpu_count() or 1
                busy = 100.0 * cores * (cur_m[0] - prev_m[0]) / total if total > 0 else 0.0
                self.samples.setdefault("machine", []).append(busy)
                self.samples.setdefault("others", []).append(max(0.0, busy - ours))
            prev_t, prev, prev_m = now, cur, cur_m

    def summary(self) -> dict:
        out = {name: {"mean": sum(v) / len(v), "peak": max(v)} for name, v in self.samples.items() if v}
        out["cores"] = os.cpu_count()
        out["ceiling"] = 100.0 * (os.cpu_count() or 1)
        return out
