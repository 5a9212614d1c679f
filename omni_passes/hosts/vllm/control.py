"""Control the passes inside a running vLLM engine: a vLLM worker extension.

Start vLLM with ``worker_extension_cls="omni_passes.vllm_control.OmniWorkerExtension"``
(``--worker-extension-cls`` on the server), then from the front end::

    llm.collective_rpc("omni_apply_placement", args=(Placement.load(p).to_dict(),))
    llm.collective_rpc("omni_status")   # report, placement, loads, rebalance events, compiles

Both run in the worker between engine steps (vLLM serialises RPCs with steps), so a placement
applied here is in place (storage rows, then tables) before the next forward, with no
recompile. Arguments and results are plain JSON-like values.
"""

from __future__ import annotations

from typing import Any


def _runtime():
    from omni_passes.hosts.vllm.runtime import VllmRuntime

    runtime = VllmRuntime.current
    if runtime is None:
        raise RuntimeError("no omni_passes runtime in this worker: is OMNI_PASSES_CONFIG set and the compile-config line given?")
    return runtime


class OmniWorkerExtension:
    """Methods vLLM mixes into its worker class (``worker_extension_cls``)."""

    def omni_apply_placement(self, placement: dict) -> dict[str, Any]:
        from omni_passes.placement.placement import Placement

        runtime = _runtime()
        new = Placement.from_dict(placement, source="placement sent to the worker")
        copied = runtime.apply_placement(new)
        return {"rows_copied": copied, "placement": new.fingerprint()}

    def omni_status(self) -> dict[str, Any]:
        from torch._dynamo.utils import counters

        runtime = _runtime()
        controller = runtime.controller
        status: dict[str, Any] = {
            "report": runtime.manager.report(),
            "graphs_compiled": runtime.manager.graphs_seen,
            # True when the compiled graphs came from vLLM's compile cache and the state was
            # built at the first op call (no pass ran in this process)
            "from_compile_cache": runtime.from_cache,
            "dynamo_unique_graphs": int(counters["stats"]["unique_graphs"]),
        }
        if controller is not None:
            status.update({
                "placement": controller.placement.to_dict(),
                "slot_row": controller.layout.slot_row.tolist(),
                "total_expert_load": controller.total_expert_load().tolist(),
                "total_slot_load": controller.total_slot_load().tolist(),
                "rows_copied": controller.rows_copied,
                "placement_updates": controller.updates,
            })
        serving = runtime.serving
        if serving is not None:
            status["serving_steps"] = serving.steps
            if serving.rebalancer is not None:
                status["rebalance_events"] = [e.to_dict() for e in serving.rebalancer.events]
        return status
