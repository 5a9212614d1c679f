"""Ascend IR (GE) op prototypes as torchair ships them, and a checker for GE graphs against them.

torchair generates one Python function per CANN IR op (``_ge_concrete_graph/auto_generated_ge_raw_ops.py``,
1,610 of them, plus ``dynamic_output_ops.py`` and the hand-written ``Cast``); each function's
docstring is the op's ``REG_OP`` registration: inputs (required, optional, dynamic) with the
dtypes they accept, outputs, attributes with their types. ``load_prototypes`` parses those.

``check_op`` compares one ``OpDef`` of a dumped GE graph (``load_graph``) with its prototype:
the op exists, its inputs and outputs are the prototype's in order (dynamic ones numbered
``x0, x1, ...``; absent optional ones as torchair writes them), every required attribute is
there and every attribute has the prototype's type. Dtypes are checked against the prototype
too, but a dumped graph leaves most of them for GE's shape inference to fill in, so the dtypes
come from ``omni_passes.testing.ge_emulator`` running the graph (``check_dtypes``).

The TensorType groups (``BasicType()``, ``IndexNumberType()``, ...) are CANN's definitions
(metadef ``TensorType``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

_ALL = ("DT_BOOL DT_COMPLEX128 DT_COMPLEX64 DT_DOUBLE DT_FLOAT DT_FLOAT16 DT_INT16 DT_INT32 DT_INT64 DT_INT8 "
        "DT_QINT16 DT_QINT32 DT_QINT8 DT_QUINT16 DT_QUINT8 DT_RESOURCE DT_STRING DT_UINT16 DT_UINT32 DT_UINT64 "
        "DT_UINT8 DT_BF16 DT_COMPLEX32")
TENSOR_TYPE_GROUPS: dict[str, frozenset[str]] = {name.lower(): frozenset(types.split()) for name, types in {
    "ALL": _ALL,
    "QuantifiedType": "DT_QINT16 DT_QINT32 DT_QINT8 DT_QUINT16 DT_QUINT8",
    "OrdinaryType": "DT_BOOL DT_COMPLEX128 DT_COMPLEX64 DT_DOUBLE DT_FLOAT DT_FLOAT16 DT_INT16 DT_INT32 DT_INT64 "
                    "DT_INT8 DT_UINT16 DT_UINT32 DT_UINT64 DT_UINT8 DT_BF16 DT_COMPLEX32",
    "BasicType": "DT_COMPLEX128 DT_COMPLEX64 DT_DOUBLE DT_FLOAT DT_FLOAT16 DT_INT16 DT_INT32 DT_INT64 DT_INT8 "
                 "DT_QINT16 DT_QINT32 DT_QINT8 DT_QUINT16 DT_QUINT8 DT_UINT16 DT_UINT32 DT_UINT64 DT_UINT8 DT_BF16 "
                 "DT_COMPLEX32",
    "NumberType": "DT_COMPLEX128 DT_COMPLEX64 DT_DOUBLE DT_FLOAT DT_FLOAT16 DT_INT16 DT_INT32 DT_INT64 DT_INT8 "
                  "DT_QINT32 DT_QINT8 DT_QUINT8 DT_UINT16 DT_UINT32 DT_UINT64 DT_UINT8 DT_BF16 DT_COMPLEX32",
    "RealNumberType": "DT_DOUBLE DT_FLOAT DT_FLOAT16 DT_INT16 DT_INT32 DT_INT64 DT_INT8 DT_UINT16 DT_UINT32 "
                      "DT_UINT64 DT_UINT8 DT_BF16",
    "ComplexDataType": "DT_COMPLEX128 DT_COMPLEX64 DT_COMPLEX32",
    "IntegerDataType": "DT_INT16 DT_INT32 DT_INT64 DT_INT8 DT_UINT16 DT_UINT32 DT_UINT64 DT_UINT8",
    "SignedDataType": "DT_INT16 DT_INT32 DT_INT64 DT_INT8",
    "UnsignedDataType": "DT_UINT16 DT_UINT32 DT_UINT64 DT_UINT8",
    "FloatingDataType": "DT_DOUBLE DT_FLOAT DT_FLOAT16",
    "IndexNumberType": "DT_INT32 DT_INT64",
    "UnaryDataType": "DT_COMPLEX128 DT_COMPLEX64 DT_DOUBLE DT_FLOAT DT_FLOAT16 DT_BF16 DT_COMPLEX32",
    "FLOAT": "DT_FLOAT DT_FLOAT16 DT_BF16",
}.items()}

# attribute type -> the AttrDef fields torchair writes it to
ATTR_FIELDS = {"Int": {"i"}, "Float": {"f"}, "Bool": {"b"}, "String": {"s"}, "Type": {"dt", "i"},
               "ListInt": {"list"}, "ListFloat": {"list"}, "ListBool": {"list"}, "ListString": {"list"},
               "ListType": {"list"}, "ListListInt": {"list_list_int"}, "Tensor": {"t"}}

TORCH_TO_GE = {torch.float32: "DT_FLOAT", torch.float16: "DT_FLOAT16", torch.bfloat16: "DT_BF16",
               torch.float64: "DT_DOUBLE", torch.int8: "DT_INT8", torch.int16: "DT_INT16", torch.int32: "DT_INT32",
               torch.int64: "DT_INT64", torch.uint8: "DT_UINT8", torch.bool: "DT_BOOL", torch.uint64: "DT_UINT64",
               torch.complex64: "DT_COMPLEX64", torch.complex128: "DT_COMPLEX128"}

# ops torchair writes itself, not from a REG_OP function: graph inputs, constants, the output
PLUMBING = frozenset({"Data", "Const", "NetOutput"})


@dataclass
class Port:
    name: str
    kind: str                  # "required" | "optional" | "dynamic"
    dtypes: frozenset[str]     # accepted dtypes (empty: not stated)


@dataclass
class OpProto:
    name: str
    inputs: list[Port] = field(default_factory=list)
    outputs: list[Port] = field(default_factory=list)
    attrs: dict[str, tuple[str, bool]] = field(default_factory=dict)   # name -> (type, required)
    source: str = ""


def _entries(doc: str) -> list[tuple[str, str]]:
    """``(KEYWORD, body)`` for each ``.KEYWORD(body)`` line of a REG_OP docstring; an entry may
    continue over several lines, and a few shipped docstrings miss a closing parenthesis."""
    joined: list[str] = []
    for line in doc.replace("\\n", "\n").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith(".") or not joined:
            joined.append(line)
        else:
            joined[-1] += " " + line
    entries = []
    for line in joined:
        match = re.match(r"\.([A-Z_]+)\((.*)$", line)
        if match is None:
            continue
        body = match.group(2)
        if body.count(")") > body.count("("):
            body = body[:body.rfind(")")]  # the entry's own closing parenthesis
        entries.append((match.group(1), body))
    return entries


def _dtypes(spec: str, datatypes: dict[str, frozenset[str]]) -> frozenset[str]:
    spec = spec.strip()
    if spec.startswith('"') and spec.endswith('"'):
        return datatypes.get(spec.strip('"'), frozenset())
    # a few shipped prototypes spell DT_FLOAT as DT_FLOAT32 (GraphDef has no such name)
    found = {"DT_FLOAT" if t == "DT_FLOAT32" else t for t in re.findall(r"\bDT_[A-Z0-9_]+", spec)}
    for group in re.findall(r"(\w+)\(\)", spec):
        found |= TENSOR_TYPE_GROUPS.get(group.lower(), frozenset())
    return frozenset(found)


def parse_reg_op(doc: str, source: str = "") -> OpProto | None:
    """One ``REG_OP(...)`` docstring → OpProto (None if ``doc`` is not one)."""
    match = re.search(r"REG_OP\((\w+)\)", doc or "")
    if match is None:
        return None
    proto = OpProto(match.group(1), source=source)
    entries = _entries(doc)
    datatypes = {}
    for keyword, body in entries:
        if keyword == "DATATYPE":
            name, _, spec = body.partition(",")
            datatypes[name.strip()] = _dtypes(spec, {})
    for keyword, body in entries:
        name, _, rest = body.partition(",")
        name = name.strip()
        if keyword in ("INPUT", "OPTIONAL_INPUT", "DYNAMIC_INPUT"):
            kind = {"INPUT": "required", "OPTIONAL_INPUT": "optional", "DYNAMIC_INPUT": "dynamic"}[keyword]
            proto.inputs.append(Port(name, kind, _dtypes(rest, datatypes)))
        elif keyword in ("OUTPUT", "DYNAMIC_OUTPUT"):
            proto.outputs.append(Port(name, "dynamic" if keyword == "DYNAMIC_OUTPUT" else "required",
                                      _dtypes(rest, datatypes)))
        elif keyword in ("ATTR", "ATRR", "REQUIRED_ATTR"):
            attr_type = rest.split(",")[0].strip()
            proto.attrs[name] = (attr_type, keyword == "REQUIRED_ATTR")
    return proto


def load_prototypes() -> dict[str, OpProto]:
    """Every IR prototype torchair ships (torchair must be importable)."""
    from torchair._ge_concrete_graph import auto_generated_ge_raw_ops, dynamic_output_ops
    from torchair.ge import _ge_graph

    protos: dict[str, OpProto] = {}
    for module in (auto_generated_ge_raw_ops, dynamic_output_ops, _ge_graph):
        for name, value in vars(module).items():
            if not callable(value):
                continue
            proto = parse_reg_op(getattr(value, "__doc__", None), f"{module.__name__}.{name}")
            if proto is not None:
                protos.setdefault(proto.name, proto)
    return protos


def load_graph(path: str | Path):
    """A GE graph dumped by torchair (``debug.graph_dump.type = "txt"``) → GraphDef."""
    from google.protobuf import text_format
    from torchair._ge_concrete_graph.ge_ir_pb2 import GraphDef

    return text_format.Parse(Path(path).read_text(), GraphDef())


def data_inputs(op) -> list[str]:
    """The data (non-control) inputs of an OpDef: torchair writes control edges as ``name:-1``."""
    return [i for i in op.input if not i.endswith(":-1")]


def check_op(op, protos: dict[str, OpProto]) -> list[str]:
    """Problems of one OpDef against its prototype (empty list: conforms)."""
    if op.type in PLUMBING:
        return []
    proto = protos.get(op.type)
    if proto is None:
        return [f"{op.name}: GE op type {op.type} has no IR prototype in this torchair"]
    problems = []
    names = [d.name for d in op.input_desc]
    expected, pos = [], 0
    for port in proto.inputs:
        if port.kind == "dynamic":
            while pos < len(names) and re.fullmatch(rf"{re.escape(port.name)}\d+", names[pos]):
                expected.append(names[pos])
                pos += 1
        else:
            expected.append(port.name)
            pos += 1
    if names != expected:
        problems.append(f"{op.name} ({op.type}): inputs {names}, prototype {[p.name for p in proto.inputs]}")
    if len(data_inputs(op)) != len(names):
        problems.append(f"{op.name} ({op.type}): {len(data_inputs(op))} input edges for {len(names)} input descs")
    for port in proto.inputs:
        if port.kind == "required" and port.name in names:
            edge = data_inputs(op)[names.index(port.name)] if names.index(port.name) < len(data_inputs(op)) else ""
            if not edge:
                problems.append(f"{op.name} ({op.type}): required input {port.name} is not connected")
    out_names = [d.name for d in op.output_desc]
    expected_out = []
    for port in proto.outputs:
        if port.kind == "dynamic":
            expected_out += [n for n in out_names if re.fullmatch(rf"{re.escape(port.name)}\d+", n)]
        else:
            expected_out.append(port.name)
    if out_names != expected_out:
        problems.append(f"{op.name} ({op.type}): outputs {out_names}, prototype {[p.name for p in proto.outputs]}")
    for name, (attr_type, required) in proto.attrs.items():
        if required and name not in op.attr:
            problems.append(f"{op.name} ({op.type}): required attribute {name} ({attr_type}) missing")
    for name in op.attr:
        if name.startswith("_"):
            continue  # torchair's own bookkeeping (_readable_value, _meta, ...)
        if name not in proto.attrs:
            problems.append(f"{op.name} ({op.type}): attribute {name} is not in the prototype")
            continue
        attr_type = proto.attrs[name][0]
        which = op.attr[name].WhichOneof("value")
        allowed = ATTR_FIELDS.get(attr_type)
        if allowed is not None and which not in allowed:
            problems.append(f"{op.name} ({op.type}): attribute {name} is {which}, prototype type {attr_type}")
    return problems


def check_dtypes(op, proto: OpProto, input_dtypes: list[torch.dtype | None],
                 output_dtypes: list[torch.dtype | None]) -> list[str]:
    """Dtypes seen on an op's inputs/outputs (from emulation) against the prototype's."""
    problems = []
    names = [d.name for d in op.input_desc]
    ports = {p.name: p for p in proto.inputs}
    for name, dtype in zip(names, input_dtypes):
        port = ports.get(re.sub(r"\d+$", "", name)) if name not in ports else ports[name]
        if port is None or dtype is None or not port.dtypes:
            continue
        if TORCH_TO_GE.get(dtype, str(dtype)) not in port.dtypes:
            problems.append(f"{op.name} ({op.type}): input {name} is {TORCH_TO_GE.get(dtype, dtype)}, "
                            f"accepted {sorted(port.dtypes)}")
    outs = [d.name for d in op.output_desc]
    out_ports = {p.name: p for p in proto.outputs}
    for name, dtype in zip(outs, output_dtypes):
        port = out_ports.get(name) or out_ports.get(re.sub(r"\d+$", "", name))
        if port is None or dtype is None or not port.dtypes:
            continue
        if TORCH_TO_GE.get(dtype, str(dtype)) not in port.dtypes:
            problems.append(f"{op.name} ({op.type}): output {name} is {TORCH_TO_GE.get(dtype, dtype)}, "
                            f"accepted {sorted(port.dtypes)}")
    return problems
