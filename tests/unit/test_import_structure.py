"""The package structure the layout promises, checked statically (the import statements of
every module, not timing): no import circles in ``omni_passes/``, ``kernels/``, ``scheduling/``
or ``proxy/``, and no graph pass (``omni_passes/fx/``) importing a host (``omni_passes/hosts/``).

Every import counts, also one inside a function: a lazy import is still a dependency, and a
circle through it is still a knot a newcomer has to untie. Only ``TYPE_CHECKING`` blocks are
left out (they never run)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("omni_passes", "kernels", "scheduling", "proxy")
ASCEND_ONLY = ("torchair", "torch_npu", "vllm_ascend")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skipped |= {id(n) for n in ast.walk(inner)}
    return skipped


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from a.b import c`` counts ``a.b.c`` when that
    is a module, else ``a.b``; a package's import of its own submodule counts too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_blocks(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module attribute path
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> nx.DiGraph:
    known = all_modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for name, path in known.items():
        for target in imports_of(name, path, known):
            # importing a submodule imports its package first: that edge is not a circle of its own
            if not name.startswith(target + "."):
                graph.add_edge(name, target)
    return graph


def test_no_import_circles():
    graph = import_graph()
    circles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not circles, "import circles (modules that import each other, directly or through others): " + "; ".join(
        " <-> ".join(c) for c in circles)


def test_graph_passes_never_import_a_host():
    graph = import_graph()
    offenders = {(a, b) for a, b in graph.edges if a.startswith("omni_passes.fx") and b.startswith("omni_passes.hosts")}
    # through other modules too: a pass must not reach a host at all
    reach = {(a, b) for a in graph if a.startswith("omni_passes.fx")
             for b in nx.descendants(graph, a) if b.startswith("omni_passes.hosts")}
    assert not offenders and not reach, f"graph passes that import the hosts wing: {sorted(offenders | reach)}"


def test_the_checker_sees_a_circle_and_a_host_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted circle and a planted host import are found."""
    fake = tmp_path / "omni_passes"
    (fake / "fx").mkdir(parents=True)
    (fake / "hosts").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "fx" / "__init__.py").write_text("")
    (fake / "hosts" / "__init__.py").write_text("")
    (fake / "a.py").write_text("def f():\n    from omni_passes import b\n")
    (fake / "b.py").write_text("from omni_passes.a import f\n")
    (fake / "fx" / "p.py").write_text("from omni_passes.hosts import x\n")
    (fake / "hosts" / "x.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("omni_passes",))
    graph = import_graph()
    assert {"omni_passes.a", "omni_passes.b"} in [set(c) for c in nx.strongly_connected_components(graph)]
    assert graph.has_edge("omni_passes.fx.p", "omni_passes.hosts.x")


def test_every_module_imports_in_a_fresh_interpreter():
    """Every module imports in a fresh interpreter: nothing depends on a circle being entered
    from the right end. A module that needs an Ascend-only package (torchair's converters are
    imported only after torchair) may fail with exactly that package missing, nothing else."""
    names = [n for n in all_modules() if not n.endswith("__main__")]
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        f"    except ModuleNotFoundError as exc:\n"
        f"        if exc.name not in {ASCEND_ONLY!r}:\n"
        "            failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
