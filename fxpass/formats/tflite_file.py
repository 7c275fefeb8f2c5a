"""What a ``.tflite`` file says about itself, read from its flatbuffer with LiteRT's own schema bindings
(``ai_edge_litert.schema_py_generated``, ``ai_edge_litert.tools.flatbuffer_utils``): the op types of its
main graph, the tensor types its precision made (float16 weights, int8 weights), its inputs, and the
fxpass metadata that :func:`with_metadata` stores in the file's ``metadata`` table under the name
``fxpass`` (the ONNX model's ``metadata_props`` as one JSON object, so :mod:`fxpass.metadata` parses both).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PARSE_ERRORS, FxpassError, first_line
from ._deps import require_module

IDENTIFIER = b"TFL3"  # the TFLite flatbuffer's file identifier (bytes 4..8)
METADATA_NAME = "fxpass"
#: LiteRT tensor types -> numpy dtype names, as fxpass.metadata.graph_inputs gives them for ONNX
_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "INT64": "int64", "INT32": "int32", "INT8": "int8"}


def _schema():
    require_module("tflite", "ai_edge_litert")
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _names(enum_class) -> dict[int, str]:
    return {v: k for k, v in vars(enum_class).items() if not k.startswith("_") and isinstance(v, int)}


def _root(data: bytes, where: str):
    if len(data) < 8 or data[4:8] != IDENTIFIER:
        raise FxpassError(f"{where}: not a LiteRT (.tflite) model (no {IDENTIFIER.decode()} identifier)")
    schema = _schema()
    try:
        model = schema.Model.GetRootAs(data, 0)
        if model.SubgraphsLength() < 1:
            raise ValueError("no subgraph")
        model.Subgraphs(0).OperatorsLength()
    except Exception as exc:  # noqa: BLE001 - a malformed flatbuffer raises many types
        raise FxpassError(f"{where}: not a readable LiteRT model ({first_line(exc)})") from None
    return schema, model


def with_metadata(data: bytes, entries: dict[str, str]) -> bytes:
    """``data`` (a .tflite flatbuffer) with ``entries`` stored as JSON under the metadata name ``fxpass``
    (replacing an earlier one)."""
    _schema()
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    import numpy as np

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    model.metadata = [m for m in (model.metadata or []) if _text(m.name) != METADATA_NAME]
    payload = json.dumps(dict(entries), sort_keys=True).encode()
    model.buffers.append(schema.BufferT(data=np.frombuffer(payload, dtype=np.uint8)))
    model.metadata.append(schema.MetadataT(name=METADATA_NAME, buffer=len(model.buffers) - 1))
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value or "")


def read_metadata(data: bytes, where: str = "model") -> dict[str, str]:
    """The ``fxpass`` metadata entries of a .tflite flatbuffer ({} when it has none)."""
    _, model = _root(data, where)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if _text(entry.Name()) != METADATA_NAME:
            continue
        buffer = model.Buffers(entry.Buffer())
        raw = buffer.DataAsNumpy().tobytes() if not buffer.DataIsNone() else b""
        try:
            value = json.loads(raw.decode())
        except PARSE_ERRORS:
            raise FxpassError(f"{where}: its fxpass metadata is not valid JSON") from None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise FxpassError(f"{where}: its fxpass metadata is not a JSON object of strings")
        return value
    return {}


@dataclass(frozen=True)
class TfliteFacts:
    """The main graph of a .tflite file: op types and counts, inputs and outputs (name -> (dtype, shape)),
    and which tensor types its weights have."""

    ops: dict[str, int]
    inputs: dict[str, tuple[str, list]]
    outputs: dict[str, tuple[str, list]]
    float16: bool
    int8: bool

    @property
    def op_types(self) -> frozenset:
        return frozenset(self.ops)

    def gathers(self) -> int:
        return self.ops.get("GATHER_ND", 0) + self.ops.get("GATHER", 0)


def _io(schema, graph, count, get, types) -> dict[str, tuple[str, list]]:
    out = {}
    for i in range(count):
        tensor = graph.Tensors(get(i))
        name = _text(tensor.Name()).removeprefix("serving_default_").removesuffix("_output").removesuffix(":0")
        out[name] = (_DTYPES.get(types.get(tensor.Type()), str(tensor.Type())),
                     [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else [])
    return out


def read_facts(data: bytes, where: str = "model") -> TfliteFacts:
    """:class:`TfliteFacts` of a .tflite flatbuffer (nothing is run)."""
    schema, model = _root(data, where)
    ops_by_code = _names(schema.BuiltinOperator)
    types = _names(schema.TensorType)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = ops_by_code.get(builtin, str(builtin))
        codes.append(_text(code.CustomCode()) if name == "CUSTOM" else name)
    graph = model.Subgraphs(0)
    ops = Counter(codes[graph.Operators(i).OpcodeIndex()] for i in range(graph.OperatorsLength()))
    weights = {types.get(graph.Tensors(i).Type()) for i in range(graph.TensorsLength())
               if graph.Tensors(i).Buffer() > 0 and not model.Buffers(graph.Tensors(i).Buffer()).DataIsNone()}
    inputs = _io(schema, graph, graph.InputsLength(), graph.Inputs, types)
    outputs = _io(schema, graph, graph.OutputsLength(), graph.Outputs, types)
    return TfliteFacts(dict(sorted(ops.items())), inputs, outputs, "FLOAT16" in weights, "INT8" in weights)


def read_tflite(path, *, require_modes: tuple[str, ...] = ()) -> Any:
    """An fxpass ``.tflite`` file as :class:`fxpass.metadata.OnnxInfo` (path, parsed metadata, inputs, op
    types, float16), with its :class:`TfliteFacts` as ``info.tflite``; FxpassError (one line) for a file
    that is not a LiteRT model or carries no fxpass metadata."""
    from .. import metadata
    from ..fileio import check_model_file

    path = check_model_file(path)
    data = Path(path).read_bytes()
    facts = read_facts(data, str(path))
    props = read_metadata(data, str(path))
    if not metadata.is_fxpass(props):
        raise FxpassError(f"{path}: a LiteRT model without fxpass metadata (not written by fxpass lower "
                          "--format tflite)")
    meta = metadata.parse(props, str(path), require=require_modes)
    metadata.check_read(path, meta, facts.inputs)  # LiteRT names its outputs itself
    info = metadata.OnnxInfo(Path(path), meta, facts.inputs, facts.op_types, facts.float16)
    info.tflite = facts  # the LiteRT facts beside the fields every check reads
    return info


def delegate_coverage(ops: dict[str, int]) -> dict[str, Any]:
    """Which of a file's op types the LiteRT GPU and Core ML delegates take, from the op lists read from their
    source (``tflite_delegates.json``: each list's source and version): per delegate, its source and
    version, the op types listed and not listed, and how many of the file's ops (by count) are listed.
    Listing is not a promise: each delegate has conditions (versions, types, attributes) not checked here."""
    table = json.loads((Path(__file__).with_name("tflite_delegates.json")).read_text(encoding="utf-8"))
    out: dict[str, Any] = {}
    for key, entry in table["delegates"].items():
        listed = set(entry["ops"])
        taken = sorted(op for op in ops if op in listed)
        out[key] = {"name": entry["name"], "source": entry["url"], "version": entry["version"],
                    "listed": taken, "not_listed": sorted(op for op in ops if op not in listed),
                    "ops_listed": sum(ops[op] for op in taken), "ops": sum(ops.values())}
    return out


def structure_problem(facts: TfliteFacts, precision: str) -> str | None:
    """Why a .tflite graph is not what ``precision`` makes of it (fp16: float16 weights; int8: int8 weights;
    fp32: neither), or None."""
    if precision == "int8" and not facts.int8:
        return "its graph has no int8 weights: it is not an int8 lowering"
    if precision == "fp16" and not facts.float16:
        return "its graph has no float16 weights: it is not an fp16 lowering"
    if precision == "fp32" and (facts.int8 or facts.float16):
        return f"its graph has {'int8' if facts.int8 else 'float16'} weights: it is not a float32 graph"
    if precision not in ("fp32", "fp16", "int8"):
        return f"LiteRT files are written at fp32, fp16 or int8, not {precision}"
    return None
