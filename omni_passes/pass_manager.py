"""Runs the configured omni passes on a post-grad graph and keeps their reports.

One object serves every entry point: Inductor's ``post_grad_custom_post_pass`` (it is a
``CustomGraphPass``, so its ``uuid`` keys Inductor's caches), vLLM's inductor-pass hook, and
torchair's ``post_grad_custom_post_pass(gm, example_inputs, config)``. A model compiled as
several graphs calls it once per graph; the reports are merged per pass. The cache key
(``uuid``) covers the configuration and the source of every pass module, so editing a pass
never reuses a stale compiled graph.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any, Callable, Protocol

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from omni_passes.fx.utils import PassReport

log = logging.getLogger("omni_passes")


class GraphPass(Protocol):
    name: str

    def __call__(self, graph: fx.Graph) -> PassReport: ...


class OmniPassManager(CustomGraphPass):
    def __init__(self, passes: list[GraphPass], fingerprint: str, report_path: str | None = None,
                 on_graph: Callable[[str, fx.Graph, dict[str, PassReport]], None] | None = None):
        """``on_graph(stage, graph, reports)`` is called with stage "before" and "after" the
        passes (``omni-passes inspect`` uses it to show the rewrite)."""
        self.passes = passes
        self.fingerprint = fingerprint
        self.report_path = report_path
        self.on_graph = on_graph
        self.reports: dict[str, PassReport] = {p.name: PassReport(p.name) for p in passes}
        self.graphs_seen = 0

    def __call__(self, graph: fx.Graph) -> None:
        from kernels import inductor_lowerings

        inductor_lowerings.register()  # Inductor is running: lower the omni ops into its code
        self.graphs_seen += 1
        this_graph: dict[str, PassReport] = {}
        if self.on_graph is not None:
            self.on_graph("before", graph, this_graph)
        for graph_pass in self.passes:
            report = graph_pass(graph)
            this_graph[graph_pass.name] = report
            self.reports[graph_pass.name].merge(report)
            log.info("omni pass %s: matched layers %s, skipped %d", graph_pass.name,
                     sorted(report.matched_layers), len(report.skipped))
        graph.eliminate_dead_code()
        if self.on_graph is not None:
            self.on_graph("after", graph, this_graph)
        if self.report_path:
            self.write_report(self.report_path)

    def uuid(self) -> Any:
        # The fingerprint covers config and placement contents; the source hash covers the code.
        return f"omni_passes:{self.fingerprint}:{source_hash(self.passes)}"

    def report(self) -> dict[str, Any]:
        return {"passes": {name: r.as_dict() for name, r in self.reports.items()}, "graphs": self.graphs_seen}

    def write_report(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report(), indent=2) + "\n")
        tmp.replace(path)


@functools.cache
def code_fingerprint() -> str:
    """sha256 over every source file of ``omni_passes`` and ``kernels``: what a host that must key
    a compile cache before any pass exists (vLLM computes its cache key in the engine process,
    before the worker builds the passes) uses for "the code". Read once per process."""
    import kernels
    import omni_passes

    digest = hashlib.sha256()
    for package in (omni_passes, kernels):
        root = Path(inspect.getsourcefile(package)).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def source_hash(passes: list) -> str:
    """sha256 over the source files of the passes' modules and of the omni ops (``kernels/``,
    whose Inductor lowerings end up in the compiled code)."""
    import kernels

    files = {inspect.getsourcefile(type(p)) for p in passes}
    files |= {str(f) for f in Path(inspect.getsourcefile(kernels)).parent.glob("*.py")}
    digest = hashlib.sha256()
    for path in sorted(f for f in files if f):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]
