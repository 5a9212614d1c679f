"""Host a benchmark cluster's simulated instances in one process (run by the bench runner).

    python -m proxy.bench.simhost CLUSTER_JSON

starts one ``SimInstance`` per instance of the cluster (OS-chosen ports, KV events on), prints
one JSON line ``{"instances": [{"url", "role", "kv_endpoint"}]}`` on stdout, and serves until
SIGTERM/SIGINT. It also measures its event loop's lag (how late a 10 ms timer fires): the
simulator's timing model is only as good as its loop's punctuality, so a run whose simulator
lags is a run on a starved machine. On exit it prints ``{"loop_lag": {...}}`` on stdout.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from proxy.bench.cluster import ClusterSpec
from proxy.bench.metrics import distribution
from proxy.sim.faults import FaultPlan
from proxy.sim.server import SimInstance

LAG_TICK_S = 0.01


async def watch_lag(samples: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(LAG_TICK_S)
        samples.append(max(0.0, loop.time() - t - LAG_TICK_S))


async def serve(spec: ClusterSpec) -> dict:
    instances = []
    lag: list[float] = []
    try:
        for k, (role, profile) in enumerate(spec.instances()):
            inst = SimInstance(0, role, profile, kv_events_port=0, faults=FaultPlan(seed=k))
            instances.append(await inst.start())
        print(json.dumps({"instances": [{"url": i.url, "role": i.role, "kv_endpoint": i.kv_endpoint}
                                        for i in instances]}), flush=True)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        watcher = loop.create_task(watch_lag(lag))
        await done.wait()
        watcher.cancel()
    finally:
        for inst in instances:
            await inst.stop()
    return {"loop_lag": {**distribution(lag), "max": max(lag, default=None), "samples": len(lag)}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = ClusterSpec.from_dict(json.loads(argv[0]), source="simhost")
    try:
        import uvloop

        result = uvloop.run(serve(spec))
    except ImportError:
        result = asyncio.run(serve(spec))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
