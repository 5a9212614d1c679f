"""FX graphs saved as JSON fixtures, so CPU tests can run passes on graphs captured elsewhere.

A post-grad graph from vLLM's CUDA build holds ops (``vllm::moe_forward_shared``, ...) that a
CPU machine without that build does not have. ``dump_graph`` writes a graph with enough to
rebuild it anywhere; ``load_graph`` rebuilds it as an ``fx.Graph`` whose nodes call real op
objects: the registered op where this process has it, else a stand-in defined from the saved
schema under the library ``omni_fixture_<namespace>`` (so a later import of the real vLLM in
the same process cannot collide with it). Node ``meta["val"]`` comes back as fake tensors with
the saved symbolic sizes (one ``ShapeEnv`` per graph; symbols keep their names).

Format (``"format": "omni-fx-graph/1"``)::

    {"format", "source", "torch",
     "schemas": {"vllm::moe_forward_shared.default": "<str(op._schema)>", ...},  # non-aten ops
     "symbols": {"s72": 8},                         # hint of every size symbol
     "nodes": [{"name", "op", "target", "args", "kwargs", "val"?}, ...]}

Targets: ``"aten::mm.default"`` for op overloads, ``"higher_order::auto_functionalized"``,
``"_operator.getitem"`` for Python callables, the plain string for placeholder/output.
Arguments: JSON scalars and lists as themselves; ``{"node": name}``; ``{"tuple": [...]}``;
``{"dtype": "bfloat16"}``; ``{"device": "cuda:0"}``; ``{"float": "inf"}``; ``{"torch":
"contiguous_format"}``; ``{"op": target}``; ``{"sym": "s72"}``; ``{"slice": [a, b, c]}``;
``{"opaque": {"type", "value", "repr"?}}`` for opaque objects such as vLLM's ``LayerName``.
Values: ``{"tensor": {"shape", "stride", "dtype", "device"}}``, ``{"symint": expr}``,
``{"tuple": [...]}``, ``{"opaque": ...}``, scalars.

Opaque objects (vLLM's hoisted ``LayerName`` graph inputs) come back as ``FixtureOpaque``
(``.value`` and ``.type_name``), registered as a torch opaque value type so that stand-in
schemas can name it (``str(schema)`` prints such types as ``PyObject``; the loader reads that
as ``FixtureOpaque``).

``graph_from_readable`` turns the text of ``GraphModule.print_readable()`` (vLLM's debug
dumps) into a graph with the same nodes, names and annotated shapes (strides are taken as
contiguous; the print does not show them). It executes that text: use it on trusted dumps only.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import json
import math
import operator
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx

FORMAT = "omni-fx-graph/1"
STANDIN_PREFIX = "omni_fixture_"
DTYPES = {
    "bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "f64": torch.float64,
    "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8, "u8": torch.uint8,
    "b8": torch.bool,
}
_lock = threading.Lock()
_libraries: dict[str, torch.library.Library] = {}
_standins: dict[str, str] = {}  # stand-in "ns::op.overload" -> the saved schema it was defined from


class FixtureError(ValueError):
    """A fixture file that cannot be read or rebuilt; the message names the file and the entry."""


# ---- opaque values ------------------------------------------------------------------------------
try:
    from torch._opaque_base import OpaqueBase as _OpaqueBase
except ImportError:  # torch without opaque types: the stand-in is a plain object
    _OpaqueBase = object


class FixtureOpaque(_OpaqueBase):
    """A saved opaque graph input (e.g. vLLM's ``LayerName``): its type name and value."""

    def __init__(self, value: Any, type_name: str = "", text: str | None = None) -> None:
        self.value = value
        self.type_name = type_name
        self.text = text  # the original object's repr, when it had a telling one

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FixtureOpaque) and (self.value, self.type_name) == (other.value, other.type_name)

    def __hash__(self) -> int:
        return hash((self.value, self.type_name))

    def __repr__(self) -> str:
        return f"FixtureOpaque({self.value!r}, {self.type_name!r})"

    def __fx_repr__(self):
        return repr(self), {"FixtureOpaque": FixtureOpaque}


def _opaque_type_name() -> str | None:
    """The schema type name of ``FixtureOpaque`` (registered once), None without opaque types."""
    try:
        from torch._library.opaque_object import (
            get_opaque_type_name,
            is_opaque_type,
            register_opaque_type,
        )
    except ImportError:
        return None
    with _lock:
        if not is_opaque_type(FixtureOpaque):
            register_opaque_type(FixtureOpaque, typ="value", hoist=True)
    return get_opaque_type_name(FixtureOpaque)


def opaque_value(value: Any) -> tuple[str, Any] | None:
    """``(type name, value)`` of an opaque object as graphs hold it: the object itself, a
    ``FakeScriptObject`` wrapping it (``.real_obj``), or a ``FixtureOpaque``; None otherwise."""
    if isinstance(value, FixtureOpaque):
        return value.type_name, value.value
    real = getattr(value, "real_obj", value)
    if isinstance(real, (torch.Tensor, int, float, bool, str, type(None), list, tuple, dict)):
        return None
    kind = type(real)
    return f"{kind.__module__}.{kind.__qualname__}", getattr(real, "value", repr(real))


# ---- targets ------------------------------------------------------------------------------------
def target_name(target: Any) -> str:
    """The saved name of a node target (see the module docstring)."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target._schema.name}.{target._overloadname}".removeprefix(STANDIN_PREFIX)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order::{target.name()}"
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if module and qualname:
        return f"{module}.{qualname}"
    raise FixtureError(f"cannot name the target {target!r}")


def resolve_target(name: str, schemas: dict[str, str] | None = None, where: str = "<fixture>") -> Any:
    """The object a saved target name stands for in this process (stand-in ops as ``load_graph``
    makes them)."""
    schemas = schemas or {}
    if name.startswith("higher_order::"):
        return getattr(torch.ops.higher_order, name.split("::", 1)[1])
    if "::" in name:
        qualified, _, overload = name.rpartition(".")
        namespace, op = qualified.split("::", 1)
        found = _registered(namespace, op, overload)
        if found is not None:
            return found
        schema = schemas.get(name)
        if schema is None:
            raise FixtureError(f"{where}: op {name} is not registered here and the fixture has no schema for it")
        return define_standin(name, schema)
    module, _, attr = name.rpartition(".")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise FixtureError(f"{where}: cannot import {module} for target {name}") from exc
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _registered(namespace: str, op: str, overload: str) -> torch._ops.OpOverload | None:
    if not _has_schema(f"{namespace}::{op}", overload):
        return None
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


def _has_schema(qualified: str, overload: str) -> bool:
    try:
        return torch._C._get_schema(qualified, "" if overload == "default" else overload) is not None
    except RuntimeError:
        return False


def standin_name(name: str) -> str:
    """``"vllm::moe_forward_shared.default"`` -> ``"omni_fixture_vllm::moe_forward_shared.default"``."""
    return STANDIN_PREFIX + name


def define_standin(name: str, schema: str) -> torch._ops.OpOverload:
    """The stand-in op for ``name`` (``ns::op.overload``), defined once per process from the
    saved ``str(op._schema)`` under the library ``omni_fixture_<ns>``. It has no kernel: tests
    match and rewrite such nodes, they do not run them."""
    qualified, _, overload = name.rpartition(".")
    namespace, op = qualified.split("::", 1)
    text = re.sub(rf"^{re.escape(qualified)}(\.\w+)?", op + ("" if overload == "default" else f".{overload}"), schema)
    # str(schema) prints unnamed alias sets as "Tensor($0! -> ) c"; the parser wants "Tensor(a0!) c"
    text = re.sub(r"\(\$(\d+)(!?)\s*(?:->[^)]*)?\)", r"(a\1\2)", text)
    opaque = _opaque_type_name()
    if "PyObject" in text:
        if opaque is None:
            raise FixtureError(f"{name}: its schema has an opaque argument and this torch has no opaque types")
        text = re.sub(r"\bPyObject\b", opaque, text)
    standin_ns = STANDIN_PREFIX + namespace
    with _lock:
        key = f"{standin_ns}::{op}.{overload}"
        if key in _standins:
            if _standins[key] != schema:
                raise FixtureError(f"stand-in {key} already defined from another schema: {_standins[key]} vs {schema}")
        else:
            library = _libraries.get(standin_ns)
            if library is None:
                library = _libraries[standin_ns] = torch.library.Library(standin_ns, "FRAGMENT")
            if not _has_schema(f"{standin_ns}::{op}", overload):
                library.define(text)
            _standins[key] = schema
    return getattr(getattr(getattr(torch.ops, standin_ns), op), overload)


# ---- dump ---------------------------------------------------------------------------------------
def _sym_text(value: Any) -> str:
    return str(value.node.expr) if isinstance(value, torch.SymInt) else str(value)


def _encode_arg(value: Any, schemas: dict[str, str]) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list):
        return [_encode_arg(v, schemas) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode_arg(v, schemas) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, (torch.memory_format, torch.layout)):
        return {"torch": str(value).removeprefix("torch.")}
    if isinstance(value, torch.SymInt):
        return {"sym": _sym_text(value)}
    if isinstance(value, slice):
        return {"slice": [_encode_arg(v, schemas) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        _note_schema(value, schemas)
        return {"op": target_name(value)}
    opaque = opaque_value(value)
    if opaque is not None:
        return {"opaque": _opaque_entry(value, opaque)}
    raise FixtureError(f"cannot save the argument {value!r} ({type(value).__name__})")


def _encode_val(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": {"shape": [_sym_or_int(d) for d in value.shape],
                           "stride": [_sym_or_int(d) for d in value.stride()],
                           "dtype": str(value.dtype).removeprefix("torch."), "device": str(value.device)}}
    if isinstance(value, torch.SymInt):
        return {"symint": _sym_text(value)}
    if isinstance(value, (list, tuple)):
        items = [_encode_val(v) for v in value]
        return items if isinstance(value, list) else {"tuple": items}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    opaque = opaque_value(value)
    if opaque is not None:
        return {"opaque": _opaque_entry(value, opaque)}
    return {"unknown": type(value).__name__}


def _opaque_entry(value: Any, opaque: tuple[str, Any]) -> dict[str, Any]:
    entry = {"type": opaque[0], "value": opaque[1] if isinstance(opaque[1], (str, int, float, bool)) else repr(opaque[1])}
    text = value.text if isinstance(value, FixtureOpaque) else repr(getattr(value, "real_obj", value))
    if text and " at 0x" not in text:  # a default object repr would make the file differ run to run
        entry["repr"] = text
    return entry


def _sym_or_int(d: Any) -> int | str:
    if isinstance(d, torch.SymInt):
        expr = d.node.expr
        return int(expr) if expr.is_number else str(expr)
    return int(d)


def _note_schema(op: Any, schemas: dict[str, str]) -> None:
    if isinstance(op, torch._ops.OpOverload) and op.namespace not in ("aten", "prims"):
        own = f"{op._schema.name}.{op._overloadname}"
        schemas[target_name(op)] = _standins.get(own) or str(op._schema)


def _hints(graph: fx.Graph) -> dict[str, int]:
    hints: dict[str, int] = {}
    for node in graph.nodes:
        values = node.meta.get("val")
        for value in values if isinstance(values, (list, tuple)) else [values]:
            sizes = list(value.shape) + list(value.stride()) if isinstance(value, torch.Tensor) else [value]
            for size in sizes:
                if isinstance(size, torch.SymInt):
                    env = size.node.shape_env
                    table = getattr(env, "backed_var_to_val", None) or env.var_to_val
                    for sym in size.node.expr.free_symbols:
                        if sym in table:
                            hints[str(sym)] = int(table[sym])
    return dict(sorted(hints.items()))


def graph_to_json(graph: fx.Graph, source: str = "") -> dict[str, Any]:
    """The fixture document of ``graph`` (see the module docstring)."""
    schemas: dict[str, str] = {}
    nodes = []
    for node in graph.nodes:
        if node.op == "call_function":
            _note_schema(node.target, schemas)
        entry: dict[str, Any] = {
            "name": node.name, "op": node.op, "target": target_name(node.target),
            "args": _encode_arg(list(node.args), schemas), "kwargs": {k: _encode_arg(v, schemas) for k, v in node.kwargs.items()},
        }
        if "val" in node.meta:
            entry["val"] = _encode_val(node.meta["val"])
        nodes.append(entry)
    return {"format": FORMAT, "source": source, "torch": torch.__version__, "schemas": dict(sorted(schemas.items())),
            "symbols": _hints(graph), "nodes": nodes}


def dump_graph(graph: fx.Graph | fx.GraphModule, path: str | Path, source: str = "", **extra: Any) -> Path:
    """Write ``graph`` to ``path`` as a fixture (``extra`` keys are added to the document)."""
    if isinstance(graph, fx.GraphModule):
        graph = graph.graph
    document = {**graph_to_json(graph, source), **extra}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1) + "\n")
    return out


# ---- load ---------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, document: dict[str, Any], where: str):
        self.where = where
        self.schemas = document.get("schemas", {})
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        self.shape_env = ShapeEnv()
        self.fake_mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.symbols: dict[str, Any] = {}
        self.hints = {str(k): int(v) for k, v in document.get("symbols", {}).items()}
        self.nodes: dict[str, fx.Node] = {}

    def sym(self, text: str | int) -> Any:
        if isinstance(text, int):
            return text
        import sympy

        expr = sympy.sympify(text, locals=self._symbols_in(text))
        if expr.is_number:
            return int(expr)
        hint = int(expr.subs({s: self.hints.get(str(s), 8) for s in expr.free_symbols}))
        return self.shape_env.create_symintnode(expr, hint=hint)

    def _symbols_in(self, text: str) -> dict[str, Any]:
        import sympy

        found = {}
        for name in set(re.findall(r"[A-Za-z_]\w*", text)):
            if name not in self.symbols:
                symbol = sympy.Symbol(name, positive=True, integer=True)
                table = getattr(self.shape_env, "backed_var_to_val", None)
                (table if table is not None else self.shape_env.var_to_val)[symbol] = sympy.Integer(self.hints.get(name, 8))
                self.symbols[name] = symbol
            found[name] = self.symbols[name]
        return found

    def arg(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.arg(v) for v in value]
        if not isinstance(value, dict):
            return value
        (kind, body), = value.items()
        if kind == "node":
            if body not in self.nodes:
                raise FixtureError(f"{self.where}: node {body} is used before it is defined")
            return self.nodes[body]
        if kind == "tuple":
            return tuple(self.arg(v) for v in body)
        if kind == "dtype":
            return getattr(torch, body)
        if kind == "device":
            return torch.device(body)
        if kind == "float":
            return float(body)
        if kind == "torch":
            return getattr(torch, body)
        if kind == "sym":
            return self.sym(body)
        if kind == "slice":
            return slice(*(self.arg(v) for v in body))
        if kind == "op":
            return resolve_target(body, self.schemas, self.where)
        if kind == "opaque":
            return FixtureOpaque(body.get("value"), body.get("type", ""), body.get("repr"))
        raise FixtureError(f"{self.where}: unknown argument kind {kind!r}")

    def val(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.val(v) for v in value]
        if not isinstance(value, dict):
            return value
        (kind, body), = value.items()
        if kind == "tensor":
            with self.fake_mode:
                return torch.empty_strided([self.sym(d) for d in body["shape"]], [self.sym(d) for d in body["stride"]],
                                           dtype=getattr(torch, body["dtype"]), device=body["device"])
        if kind == "symint":
            return self.sym(body)
        if kind == "tuple":
            return tuple(self.val(v) for v in body)
        if kind == "opaque":
            return FixtureOpaque(body.get("value"), body.get("type", ""), body.get("repr"))
        return None


def graph_from_json(document: dict[str, Any], where: str = "<fixture>") -> fx.Graph:
    """Rebuild the graph of a fixture document (see ``load_graph``)."""
    if document.get("format") != FORMAT:
        raise FixtureError(f"{where}: format {document.get('format')!r}, expected {FORMAT!r}")
    build = _Builder(document, where)
    graph = fx.Graph()
    for i, entry in enumerate(document["nodes"]):
        at = f"{where}: node {i} ({entry.get('name')})"
        op, name = entry["op"], entry["name"]
        if op == "placeholder":
            node = graph.create_node(op, entry["target"], name=name)
        elif op == "output":
            node = graph.create_node(op, "output", tuple(build.arg(entry["args"])), name=name)
        elif op in ("call_function", "get_attr"):
            target = resolve_target(entry["target"], build.schemas, at) if op == "call_function" else entry["target"]
            node = graph.create_node(op, target, tuple(build.arg(entry["args"])),
                                     {k: build.arg(v) for k, v in entry["kwargs"].items()}, name=name)
        else:
            raise FixtureError(f"{at}: node kind {op!r} is not supported")
        if node.name != name:
            raise FixtureError(f"{at}: duplicate node name")
        if "val" in entry:
            node.meta["val"] = build.val(entry["val"])
        build.nodes[name] = node
    graph.lint()
    return graph


def load_graph(path: str | Path) -> fx.Graph:
    """Rebuild the ``fx.Graph`` saved at ``path`` (``dump_graph``), on CPU, with stand-in ops
    where this process lacks the originals."""
    where = str(path)
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FixtureError(f"{where}: cannot read the fixture ({exc})") from exc
    return graph_from_json(document, where)


# ---- readable dumps -----------------------------------------------------------------------------
_ANNOTATION = re.compile(r"^(\w+)\[(.*)\]$")


def _parse_annotation(text: str | None, device: str) -> dict[str, Any] | None:
    if not text:
        return None
    if text.startswith("Sym(") and text.endswith(")"):
        return {"symint": text[4:-1]}
    match = _ANNOTATION.match(text)
    if not match or match.group(1) not in DTYPES:
        return None
    dims: list[int | str] = [int(d) if d.strip().lstrip("-").isdigit() else d.strip()
                             for d in match.group(2).split(",") if d.strip()]
    stride, running = [], "1"
    for d in reversed(dims):  # contiguous strides, as expressions
        stride.append(_simplify(running))
        running = f"({running})*({d})"
    return {"tensor": {"shape": dims, "stride": list(reversed(stride)),
                       "dtype": str(DTYPES[match.group(1)]).removeprefix("torch."), "device": device}}


def _simplify(expr: str) -> int | str:
    import sympy

    value = sympy.sympify(expr)
    return int(value) if value.is_number else str(value)


def graph_from_readable(source: str, schemas: dict[str, str] | None = None, device: str = "cuda:0",
                        opaque: dict[str, FixtureOpaque] | None = None) -> fx.Graph:
    """The graph printed by ``GraphModule.print_readable()`` (one flat ``forward``).

    Args:
        source: the printed module text (it is executed: trusted dumps only).
        schemas: ``{"ns::op.overload": str(schema)}`` for non-aten ops this process lacks.
        device: the device of every tensor value (the print does not show it).
        opaque: values for unannotated placeholders that hold opaque objects (``LayerName``).
    """
    schemas = dict(schemas or {})
    tree = ast.parse(source)
    module_class = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    forward = next(n for n in module_class.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    params = {a.arg: (ast.literal_eval(a.annotation) if a.annotation is not None else None) for a in forward.args.args[1:]}
    assigned: list[tuple[str, str | None]] = []
    for stmt in forward.body:  # every statement that computes something made one node
        computes = getattr(stmt, "value", None) is not None and not isinstance(stmt.value, (ast.Constant, ast.Name))
        if isinstance(stmt, ast.AnnAssign) and computes:
            assigned.append((stmt.target.id, ast.literal_eval(stmt.annotation)))
        elif isinstance(stmt, ast.Assign) and computes:
            assigned.append((stmt.targets[0].id, None))
    ops = _OpsFacade(schemas)
    namespace: dict[str, Any] = {"torch": _TorchFacade(ops), "device": torch.device, "__builtins__": builtins}
    body = "\n".join(line for line in source.splitlines() if not line.startswith(("import ", "from ")))
    exec(compile(body, "<readable graph>", "exec"), namespace)  # noqa: S102  (trusted dumps, see docstring)
    module = namespace[module_class.name]()
    traced = fx.Tracer().trace(module)
    calls = [n for n in traced.nodes if n.op == "call_function"]
    if len(calls) != len(assigned):
        raise FixtureError(f"readable graph: {len(calls)} traced calls but {len(assigned)} assignments")
    names = {n: name for n, (name, _) in zip(calls, assigned)}
    annotations = {n: annotation for n, (_, annotation) in zip(calls, assigned)}
    graph, copies = fx.Graph(), {}  # a fresh graph, so every node gets its printed name
    build = _Builder({"symbols": {}}, "<readable graph>")
    for node in traced.nodes:
        args = fx.node.map_arg(node.args, lambda n: copies[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: copies[n])
        copy = graph.create_node(node.op, node.target, args, kwargs, name=names.get(node, node.name))
        copies[node] = copy
        if node.op == "placeholder":
            spec = _parse_annotation(params.get(node.target), device)
            if spec is None and opaque and node.target in opaque:
                copy.meta["val"] = opaque[node.target]
        else:
            spec = _parse_annotation(annotations.get(node), device)
        if spec is not None:
            copy.meta["val"] = build.val(spec)
    calls = [copies[n] for n in calls]
    for node in calls:  # tuple outputs: the values of their getitems
        users = list(node.users)
        if "val" not in node.meta and users and all(u.target is operator.getitem and "val" in u.meta for u in users):
            values = {u.args[1]: u.meta["val"] for u in users}
            if sorted(values) == list(range(len(values))):
                node.meta["val"] = tuple(values[i] for i in range(len(values)))
    return graph


class _OpsFacade:
    """``torch.ops`` for executing a printed graph: real ops where registered, else stand-ins."""

    def __init__(self, schemas: dict[str, str]):
        self.schemas = schemas

    def __getattr__(self, namespace: str) -> Any:
        facade = self

        class _Namespace:
            def __getattr__(self, op: str) -> Any:
                class _Packet:
                    def __getattr__(self, overload: str) -> Any:
                        return resolve_target(f"{namespace}::{op}.{overload}", facade.schemas, "readable graph")

                return _Packet()

        return _Namespace()


class _TorchFacade:
    def __init__(self, ops: _OpsFacade):
        self.ops = ops

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def count_targets(graph: fx.Graph, predicate: Callable[[fx.Node], bool] | None = None) -> dict[str, int]:
    """``{target name: calls}`` of the graph's call_function nodes (op counts for tests)."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_function" and (predicate is None or predicate(node)):
            key = target_name(node.target)
            counts[key] = counts.get(key, 0) + 1
    return counts
